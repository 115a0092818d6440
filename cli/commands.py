"""Client commands of `tokenpool`: submit, follow, status, cancel, embed, workers, models.

They talk to the API over HTTP (`--url`, or TOKENPOOL_URL; `--api-key` or TOKENPOOL_API_KEY),
so they work against a remote box as well as `tokenpool up` on this one. Every read command
takes `--json` for scripts; tokens go to stdout as they come, everything else to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.client import DEFAULT_URL, ApiFailure, Client

err = Console(stderr=True)
out = Console()

Url = Annotated[str, typer.Option("--url", envvar="TOKENPOOL_URL", help="the API's base URL")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="TOKENPOOL_API_KEY",
                                            help="bearer token, if the API has keys")]
Json = Annotated[bool, typer.Option("--json", help="machine-readable output")]


@contextmanager
def client(url: str, api_key: str | None) -> Iterator[Client]:
    """A client whose failures end the command with the API's own message and exit code 1."""
    try:
        with Client(url, api_key) as c:
            yield c
    except ApiFailure as exc:
        err.print(f"[red]error[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


def fetch(url: str, api_key: str | None, as_json: bool, call: Callable[[Client], Any]) -> Any:
    """`call`'s answer; with --json it is printed as is and None comes back."""
    with client(url, api_key) as c:
        data = call(c)
    if as_json:
        print_json(data)
        return None
    return data


def read_text(text: str | None, file: Path | None) -> str:
    if file is not None:
        return sys.stdin.read() if str(file) == "-" else file.read_text()
    if text is None:
        raise typer.BadParameter("give the text, or --file PATH (- for stdin)")
    return text


def submit(
    text: Annotated[str | None, typer.Argument(help="the prompt (or, with --kind summarize, "
                                               "the text to summarise)")] = None,
    kind: Annotated[str, typer.Option(help="generate or summarize")] = "generate",
    model: Annotated[str | None, typer.Option(help="model name (default: chat / summary)")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-F", help="read the text from a file; "
                                              "- for stdin")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="send the text as a user message")] = False,
    system: Annotated[str | None, typer.Option(help="a system message (implies --chat)")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str] | None, typer.Option(help="a stop string (repeatable)")] = None,
    priority: Annotated[int | None, typer.Option(help="0 least urgent .. 9 most")] = None,
    instructions: Annotated[str | None, typer.Option(help="summaries: how to summarise")] = None,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="stream the tokens")] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False,
) -> None:
    """Queue a generation or summary job; print its id (or, with --follow, its tokens)."""
    body = job_body(kind, read_text(text, file), chat or system is not None, system)
    options = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
               "seed": seed, "stop": stop, "priority": priority, "instructions": instructions}
    body |= {k: v for k, v in options.items() if v is not None}
    with client(url, api_key) as c:
        reply = c.submit(body)
        if follow_:
            err.print(f"[dim]job {reply['id']}[/dim]", highlight=False)
            stream_job(c, reply["id"], as_json)
        elif as_json:
            print_json(reply)
        else:
            print(reply["id"])


def job_body(kind: str, text: str, chat: bool, system: str | None) -> dict[str, Any]:
    if kind == "summarize":
        return {"kind": "summarize", "text": text}
    if kind != "generate":
        raise typer.BadParameter(f"--kind is generate or summarize, not {kind!r}")
    if not chat:
        return {"kind": "generate", "prompt": text}
    messages = [{"role": "system", "content": system}] if system else []
    return {"kind": "generate", "messages": [*messages, {"role": "user", "content": text}]}


def follow(
    job_id: Annotated[str, typer.Argument(help="the job id")],
    after: Annotated[int, typer.Option(help="start after this seq (default: the start)")] = -1,
    url: Url = DEFAULT_URL, api_key: ApiKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="every event as a JSON line")] = False,
) -> None:
    """Stream a job's tokens live, from the start; resumes if the connection drops.

    Exit code: 0 done, 1 failed, 2 cancelled.
    """
    with client(url, api_key) as c:
        stream_job(c, job_id, as_json, after)


def stream_job(c: Client, job_id: str, as_json: bool, after: int = -1) -> None:
    final: dict[str, Any] = {}
    for event in c.events(job_id, after):
        if as_json:
            print_json(event)
        elif event["type"] == "token":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif event["type"] in ("requeued", "stage"):
            err.print(f"\n[dim]{escape(describe(event))}[/dim]", highlight=False)
        final = event
    if not as_json:
        sys.stdout.write("\n")
        err.print(f"[dim]{escape(describe(final))}[/dim]", highlight=False)
    raise typer.Exit({"done": 0, "error": 1, "cancelled": 2}.get(final.get("type", ""), 1))


def describe(event: dict[str, Any]) -> str:
    kind = event.get("type")
    if kind == "done":
        usage, timings = event.get("usage", {}), event.get("timings", {})
        return (f"done: {usage.get('completion_tokens', 0)} tokens, "
                f"{timings.get('tokens_per_s', 0):.1f} tokens/s, "
                f"first token after {timings.get('ttft_s', 0):.2f}s")
    if kind == "error":
        return f"failed: {event['error']['type']}: {event['error']['message']}"
    if kind == "requeued":
        return f"requeued (attempt {event.get('attempt')}): {event.get('reason')}"
    if kind == "stage":
        part = f" {event['part']}/{event['parts']}" if event.get("parts") else ""
        return f"stage {event.get('stage')}{part}"
    return str(kind)


def status(job_id: Annotated[str, typer.Argument(help="the job id")],
           url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """A job's status, result, usage and timings."""
    job = fetch(url, api_key, as_json, lambda c: c.job(job_id))
    if job is None:
        return
    table = Table(show_header=False, box=None)
    for name in ("id", "kind", "model", "status", "worker", "attempts"):
        table.add_row(f"[bold]{name}[/bold]", str(job.get(name)))
    for name in ("usage", "timings", "error"):
        if job.get(name):
            table.add_row(f"[bold]{name}[/bold]", escape(", ".join(
                f"{k}={v}" for k, v in job[name].items())))
    result = job.get("result") or {}
    text = result.get("text", result.get("summary"))
    if text is not None:
        table.add_row("[bold]result[/bold]", escape(text))
    elif "embeddings" in result:
        table.add_row("[bold]result[/bold]", f"{len(result['embeddings'])} vectors of "
                      f"{result['dimensions']} dimensions")
    out.print(table)


def cancel(job_id: Annotated[str, typer.Argument(help="the job id")],
           url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Cancel a job: a queued one never runs, a running one stops within one token."""
    reply = fetch(url, api_key, as_json, lambda c: c.cancel(job_id))
    if reply is not None:
        print(reply.get("detail") or f"{job_id}: {reply['status']}")


def embed(
    texts: Annotated[list[str], typer.Argument(help="one or more texts")],
    model: Annotated[str, typer.Option(help="embedding model")] = "embed",
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False,
) -> None:
    """Embed texts (one job) and print the vectors (--json: the whole result)."""
    with client(url, api_key) as c:
        job = c.wait(c.submit({"kind": "embed", "model": model, "texts": texts})["id"])
    if job["status"] != "succeeded":
        err.print(f"[red]error[/red] job {job['id']} {job['status']}: "
                  f"{escape(str(job.get('error')))}")
        raise typer.Exit(1)
    if as_json:
        print_json({"id": job["id"], **job["result"]})
        return
    table = Table("text", "vector", title=f"{job['result']['dimensions']} dimensions")
    for text, vector in zip(texts, job["result"]["embeddings"], strict=True):
        table.add_row(escape(text), " ".join(f"{x:+.3f}" for x in vector[:6]) + " …")
    out.print(table)


def workers(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """The live workers: model, GPU, state, jobs running and done."""
    fleet = fetch(url, api_key, as_json, Client.workers)
    if fleet is None:
        return
    table = Table("name", "model", "gpu", "state", "running", "done", "failed", "seen")
    now = time.time()
    for w in fleet:
        table.add_row(w["name"], w.get("model"), str(w.get("gpu")), w.get("state"),
                      str(len(w.get("jobs") or [])), str(w.get("jobs_done", 0)),
                      str(w.get("jobs_failed", 0)), f"{now - w.get('ts', now):.1f}s ago")
    out.print(table if fleet else "[yellow]no live workers[/yellow]")


def models(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """The configured models: kind, context, queue depth, running jobs, live workers."""
    data = fetch(url, api_key, as_json, Client.models)
    if data is None:
        return
    table = Table("model", "kind", "n_ctx", "max_tokens", "queued", "running", "workers")
    for m in data:
        table.add_row(m["id"], m["kind"], str(m["n_ctx"]), str(m["max_tokens"]),
                      str(m["queue_depth"]), str(m["running"]), str(len(m["workers"])))
    out.print(table)


COMMANDS = (submit, follow, status, cancel, embed, workers, models)
