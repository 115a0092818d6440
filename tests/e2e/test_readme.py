"""The README's tour and the docs' examples for each interface, run as written against the real
stack (only the address is changed to the test API's); the README's links and size."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
README_MAX_LINES = 250


def blocks(section: str | None, language: str, page: str = "README.md") -> list[str]:
    """The fenced code blocks of one `## section` of a page (None: the whole page)."""
    body = (ROOT / page).read_text()
    if section is not None:
        body = body.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def at(stack: Stack, text: str) -> str:
    return text.replace("http://127.0.0.1:8000", stack.url).replace(
        "localhost:8000", stack.url.removeprefix("http://"))


def test_the_openai_python_example_runs_as_written(stack: Stack) -> None:
    (code,) = blocks(None, "python", "docs/openai.md")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(at(stack, code), "README.md", "exec"), {})
    text = printed.getvalue()
    assert "CompletionUsage(" in text and "completion_tokens=" in text
    assert len(text.strip()) > len("CompletionUsage(")


def test_the_openai_curl_example_streams_to_done(stack: Stack) -> None:
    curl = blocks(None, "sh", "docs/openai.md")[0]
    command = "\n".join(line for line in curl.splitlines() if not line.startswith("#"))
    run = subprocess.run(["bash", "-c", at(stack, command)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("data: ")]
    assert lines[0].startswith('data: {"id": "chatcmpl-') and lines[-1] == "data: [DONE]"


def test_the_cli_examples_run_as_written(stack: Stack, tmp_path: Path) -> None:
    (clients,) = [b for b in blocks(None, "sh", "docs/cli.md") if "id=$(tokenpool submit" in b]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    env |= {"TOKENPOOL_URL": stack.url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", clients], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "done: " in run.stderr and "succeeded" in run.stdout
    assert "384 dimensions" in run.stdout and "chat-cpu" in run.stdout


def cli_env(stack: Stack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    return env | {"TOKENPOOL_URL": stack.url,
                  "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def test_the_readme_tour_runs_as_written(stack: Stack, tmp_path: Path) -> None:
    curl, cli = blocks("A five-minute tour", "sh")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", at(stack, curl)],
                         capture_output=True, text=True, timeout=300, env=cli_env(stack))
    assert run.returncode == 0, run.stderr
    compact = run.stdout.replace(" ", "")
    assert "event:done" in compact and '"status":"succeeded"' in compact
    assert '"cancelled":false' in compact and '"status":"queued"' in compact
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", cli], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=cli_env(stack))
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "succeeded"
    (code,) = blocks("A five-minute tour", "python")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(at(stack, code), "README.md", "exec"), {})
    assert printed.getvalue().strip().splitlines()[-1].startswith("resp_")


def test_the_readme_fits_its_budget_and_every_link_in_it_resolves() -> None:
    assert len(README.splitlines()) <= README_MAX_LINES
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert len(local) > 20
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
