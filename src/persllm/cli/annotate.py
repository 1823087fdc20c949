"""``persllm annotate``: write grounded chain-of-thought dialogues with the annotator LLM."""

import json
import sys
from typing import Annotated, Any

import typer

from persllm.annotate import run
from persllm.cli.app import ConfigArg, SetOption, WaitOption, app, load, writing
from persllm.config.stages import AnnotateSettings


@app.command()
def annotate(
    config: ConfigArg,
    persona: Annotated[
        list[str] | None, typer.Option("--persona", "-p", help="Annotate only this persona (repeatable).")
    ] = None,
    stage: Annotated[
        list[str] | None, typer.Option("--stage", "-s", help="Only this stage id (repeatable).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Only the first N planned dialogues (a spread of kinds)."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-c", min=1, help="Dialogues in flight (default annotator.concurrency)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the exact prompts of one dialogue; call no model.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    wait: WaitOption = False,
    set_options: SetOption = None,
) -> None:
    """Generate user inputs and in-character replies (analysis + response) into annotations/<persona>.jsonl.

    Finished dialogues are kept and skipped on a re-run; every model call is cached in cache.sqlite.

    Example: persllm annotate my-persona/persllm.yaml --limit 8 --concurrency 16
    """

    project = load(config, set_options)
    for persona_id in persona or []:
        project.persona(persona_id)
    with writing(project, "annotate", wait):
        result = run(
            *AnnotateSettings.of_project(project),
            personas=persona or None,
            stages=stage or None,
            limit=limit,
            concurrency=concurrency,
            dry_run=dry_run,
            progress=sys.stderr.isatty(),
        )
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
    elif dry_run:
        print_prompts(result)
    else:
        print_summary(result, str(project.layout.annotations))


def print_prompts(result: dict[str, Any]) -> None:
    item = result["item"]
    typer.echo(
        f"dry run: item {item['id']} ({item['persona']}/{item['stage']}, {item['kind']}, "
        f"seed {item['seed']}); reply format {result['output']}; params {json.dumps(result['params'])}; "
        "no model was called"
    )
    for step, messages in result["messages"].items():
        typer.echo(f"\n======== {step} prompt ========")
        for message in messages:
            typer.echo(f"--- {message['role']} ---\n{message['content']}")


def print_summary(result: dict[str, Any], folder: str) -> None:
    failed = result["failed"]
    typer.echo(
        f"annotate: {result['done']} written, {result['skipped']} already done, "
        f"{sum(failed.values())} malformed (ordinary {failed['ordinary']}, "
        f"misleading {failed['misleading']}, opinion {failed['opinion']}), {result['errors']} errors; "
        f"{result['calls']} calls "
        f"({result['cached_calls']} from cache), {sum(result['tokens'].values())} tokens, "
        f"{result['seconds']:.1f}s -> {folder}"
    )
    sources = ", ".join(f"{name} {count}" for name, count in result.get("sources", {}).items())
    if sources:
        typer.echo(f"planned by where the reply comes from: {sources}")
    if result["malformed"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(result["malformed"].items()))
        typer.echo(f"malformed outputs retried or dropped: {reasons}")
    if result["first_error"]:
        typer.echo(f"first error: {result['first_error']}", err=True)
    if sum(failed.values()):
        typer.echo(
            "malformed dialogues are not written; a re-run gets the same cached outputs, so raise "
            "annotate.max_attempts (new samples) or use a stronger annotator model to fill them"
        )
