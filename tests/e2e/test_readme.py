"""The README's examples for each interface, run as written against the real stack (only the
address is changed to the test API's)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def blocks(section: str, language: str) -> list[str]:
    """The fenced code blocks of one `## section` of the README."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.S)


def at(stack: Stack, text: str) -> str:
    return text.replace("http://127.0.0.1:8000", stack.url).replace(
        "localhost:8000", stack.url.removeprefix("http://"))


def test_the_openai_python_example_runs_as_written(stack: Stack) -> None:
    (code,) = blocks("OpenAI clients", "python")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(at(stack, code), "README.md", "exec"), {})
    text = printed.getvalue()
    assert "CompletionUsage(" in text and "completion_tokens=" in text
    assert len(text.strip()) > len("CompletionUsage(")


def test_the_openai_curl_example_streams_to_done(stack: Stack) -> None:
    curl = blocks("OpenAI clients", "sh")[0]
    command = "\n".join(line for line in curl.splitlines() if not line.startswith("#"))
    run = subprocess.run(["bash", "-c", at(stack, command)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("data: ")]
    assert lines[0].startswith('data: {"id": "chatcmpl-') and lines[-1] == "data: [DONE]"


def test_the_cli_examples_run_as_written(stack: Stack, tmp_path: Path) -> None:
    (clients,) = [b for b in blocks("CLI", "sh") if "id=$(tokenpool submit" in b]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOOL_")}
    env |= {"TOKENPOOL_URL": stack.url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", clients], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert "done: " in run.stderr and "succeeded" in run.stdout
    assert "384 dimensions" in run.stdout and "chat-cpu" in run.stdout
