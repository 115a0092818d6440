#!/usr/bin/env bash
# A batch run from a JSONL file (one {"id", "text"} a line) with the CLI: every line becomes a
# summarize job at batch priority; a progress bar while it runs, a table at the end, and one
# result line per item in results.jsonl (submission order, matched by id).
#   TOKENPOOL_URL=http://127.0.0.1:8000 bash examples/batch/run.sh
set -euo pipefail
cd "$(dirname "$0")"
tokenpool batch summarize transcripts.jsonl --instructions "one line: who does what" \
  --max-tokens 32 --out results.jsonl
