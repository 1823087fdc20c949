"""``persllm logs``: the most recent LLM calls from the project's SQLite call log."""

import json
from typing import Annotated, Any

import typer

from persllm.cli.app import ConfigArg, SetOption, app, load
from persllm.cli.project import table
from persllm.jsonl import read_jsonl
from persllm.llm.cache import CallCache


@app.command()
def logs(
    config: ConfigArg,
    n: Annotated[int, typer.Option("-n", "--number", min=1, help="How many calls to show.")] = 20,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line, with the full request.")
    ] = False,
    tag: Annotated[str | None, typer.Option("--tag", help="Only calls with this tag, e.g. annotate.")] = None,
    set_options: SetOption = None,
) -> None:
    """Show the most recent LLM calls, newest first: time, backend, model, tokens, seconds, whether
    the answer came from the cache, and the start of the reply.

    Example: persllm logs my-persona/persllm.yaml -n 5
    """

    project = load(config, set_options)
    path = project.layout.cache
    if not path.exists():
        typer.echo(f"no calls logged yet ({path} does not exist)", err=True)
        return
    cache = CallCache(path)
    try:
        rows = cache.recent(n, tag=tag)
        stats = cache.stats()
    finally:
        cache.close()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    typer.echo(
        f"{stats['calls']} calls answered, {stats['hits']} served from the cache, "
        f"{stats['prompt_tokens'] + stats['completion_tokens']} tokens, {stats['seconds']:.1f} model seconds"
    )
    for row in rows:
        typer.echo(format_row(row))


def format_row(row: dict[str, Any]) -> str:
    """One call as a table line: the reply's first 60 characters on one line."""
    from datetime import datetime

    when = datetime.fromtimestamp(row["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
    tokens = f"{row['prompt_tokens'] or 0}+{row['completion_tokens'] or 0}"
    reply = " ".join(str(row["response"]).split())
    reply = reply if len(reply) <= 60 else reply[:60] + "…"
    source = "cached" if row["cached"] else "model"
    return (
        f"{when}  {row['backend']:<12} {row['model'][:28]:<28} {tokens:>9} tok "
        f"{row['seconds'] or 0:7.2f}s  {source:<6}  {reply}"
    )


@app.command()
def failures(
    config: ConfigArg,
    stage: Annotated[str, typer.Option("--stage", help="Whose failures: annotate.")] = "annotate",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    set_options: SetOption = None,
) -> None:
    """List the items a stage could not finish: id, persona, stage, kind, reason, attempts.

    Items whose every attempt was malformed are given up (a re-run gets the same cached outputs); items
    that hit model errors are missing, and `persllm run` tries them again.

    Example: persllm failures my-persona/persllm.yaml
    """

    project = load(config, set_options)
    path = project.layout.failures(stage)
    rows = read_jsonl(path)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
        return
    if not rows:
        typer.echo(f"no failed {stage} items ({path})")
        return
    columns = ["id", "persona", "stage", "kind", "attempts", "given_up", "reason"]
    shown = [{**row, "reason": str(row.get("reason", ""))[:80]} for row in rows]
    typer.echo(table(columns, shown))
    missing = sum(not row.get("given_up") for row in rows)
    typer.echo(
        f"{len(rows)} items: {missing} missing (tried again by `persllm run`), {len(rows) - missing} given up"
    )
