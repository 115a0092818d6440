"""`tokenpool batch …`: submit files as a batch, follow it with a progress bar, write results.

    tokenpool batch summarize notes/ call-0412.txt --out results.jsonl
    tokenpool batch follow 9a1e… --out results.jsonl     # after a Ctrl-C, or from elsewhere
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli.client import DEFAULT_URL, Client
from cli.commands import ApiKey, Json, Url, client, err, fetch, print_json

batch_app = typer.Typer(no_args_is_help=True, help="Batch runs: many items, one call.")
Out = Annotated[Path | None, typer.Option("--out", "-o", help="write results here (JSONL)")]


def items_from(paths: list[Path]) -> Iterator[dict[str, str]]:
    """Items from files (one each, id = the path), directories (every file in them, sorted)
    and .jsonl files (one {"id", "text"} a line)."""
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()
                               and not p.name.startswith(".")):
                yield {"id": str(file.relative_to(path)), "text": file.read_text()}
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)
        elif path.is_file():
            yield {"id": path.name, "text": path.read_text()}
        else:
            raise typer.BadParameter(f"{path} is not a file or directory")


def submit(kind: str, paths: list[Path], params: dict[str, Any], out: Path | None,
           url: str, api_key: str | None, as_json: bool) -> None:
    items = list(items_from(paths))
    if not items:
        raise typer.BadParameter("no items in those paths")
    lines = (json.dumps(item).encode() + b"\n" for item in items)
    with client(url, api_key) as c:
        reply = c.create_batch({"kind": kind, **{k: v for k, v in params.items()
                                                 if v is not None}}, lines)
        follow_batch(c, reply["id"], out, as_json,
                     f"batch [bold]{reply['id']}[/bold]: {reply['total']} items")


@batch_app.command()
def summarize(
    paths: Annotated[list[Path], typer.Argument(help="files, directories or .jsonl files")],
    out: Out = None,
    model: Annotated[str | None, typer.Option(help="default: summary")] = None,
    instructions: Annotated[str | None, typer.Option(help="how to summarise")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t")] = None,
    priority: Annotated[int | None, typer.Option(help="0..9; batches default to 2")] = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False,
) -> None:
    """Summarise every file as one batch; a progress bar, then a table (and --out JSONL)."""
    submit("summarize", paths, {"model": model, "instructions": instructions,
                                "max_tokens": max_tokens, "temperature": temperature,
                                "priority": priority}, out, url, api_key, as_json)


@batch_app.command()
def embed(
    paths: Annotated[list[Path], typer.Argument(help="files, directories or .jsonl files")],
    out: Out = None,
    model: Annotated[str | None, typer.Option(help="default: embed")] = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False,
) -> None:
    """Embed every file (or JSONL line) as one batch."""
    submit("embed", paths, {"model": model}, out, url, api_key, as_json)


@batch_app.command()
def follow(
    batch_id: Annotated[str, typer.Argument(help="the batch id")], out: Out = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False,
) -> None:
    """Follow a batch to its end (again after a Ctrl-C): progress, then results."""
    with client(url, api_key) as c:
        follow_batch(c, batch_id, out, as_json)


@batch_app.command()
def status(batch_id: Annotated[str, typer.Argument(help="the batch id")],
           url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """A batch's counts, tokens, throughput and ETA."""
    report = fetch(url, api_key, as_json, lambda c: c.batch(batch_id))
    if report is not None:
        summary_table(report, [])


@batch_app.command()
def cancel(batch_id: Annotated[str, typer.Argument(help="the batch id")],
           url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Cancel every item that has not finished."""
    reply = fetch(url, api_key, as_json,
                  lambda c: c.call("DELETE", f"/v1/batches/{batch_id}"))
    if reply is not None:
        print(", ".join(f"{k}: {v}" for k, v in reply["cancelled"].items()))


@batch_app.command()
def retry(batch_id: Annotated[str, typer.Argument(help="the batch id")],
          url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: Json = False) -> None:
    """Queue the failed items again."""
    reply = fetch(url, api_key, as_json,
                  lambda c: c.call("POST", f"/v1/batches/{batch_id}/retry"))
    if reply is not None:
        print(f"{reply['retried']} items queued again")


def follow_batch(c: Client, batch_id: str, out: Path | None, as_json: bool,
                 announce: str | None = None) -> None:
    try:
        if announce:
            err.print(announce, highlight=False)
        report = watch(c, batch_id)
    except KeyboardInterrupt:
        err.print(f"\nstopped following; the batch goes on. Resume with:\n  tokenpool batch "
                  f"follow {batch_id}" + (f" --out {out}" if out else ""), highlight=False)
        raise typer.Exit(130) from None
    lines = list(c.batch_results(batch_id))
    if out is not None:
        with out.open("w") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    if as_json:
        print_json(report if out is not None else {**report, "results": lines})
    else:
        summary_table(report, lines)
        if out is not None:
            err.print(f"results: {out}", highlight=False)
    if report["counts"]["failed"]:
        raise typer.Exit(1)


def watch(c: Client, batch_id: str) -> dict[str, Any]:
    """A progress bar until the batch ends; its last report."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn())
    report: dict[str, Any] = {}
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(batch_id[:8], total=None, detail="")
        for report in c.batch_progress(batch_id):
            counts = report["counts"]
            ended = counts["succeeded"] + counts["failed"] + counts["cancelled"]
            detail = (f"{counts['running']} running, {counts['failed']} failed, "
                      f"{report['tokens_per_s']:.0f} tok/s")
            bar.update(task, total=report["total"], completed=ended, detail=detail)
    return report


def summary_table(report: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    table = Table(title=f"batch {report['id']} — {report['status']}")
    for name in ("total", "succeeded", "failed", "cancelled", "tokens"):
        table.add_column(name, justify="right")
    counts = report["counts"]
    table.add_row(str(report["total"]), str(counts["succeeded"]), str(counts["failed"]),
                  str(counts["cancelled"]), str(report["tokens"]))
    err.print(table)
    failed = [line for line in lines if line["status"] == "failed"][:10]
    for line in failed:
        err.print(f"[red]failed[/red] {escape(line['id'])}: "
                  f"{escape(str((line.get('error') or {}).get('message')))}", highlight=False)
