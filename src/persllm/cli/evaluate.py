"""``persllm eval`` and ``persllm report``: compare systems on the held-out split, and rebuild the report."""

from typing import Annotated

import typer

from persllm import evaluate
from persllm.cli.app import ConfigArg, SetOption, WaitOption, app, load, writing
from persllm.cli.run import headline
from persllm.config.stages import EvalSettings
from persllm.evaluate import report


@app.command("eval")
def eval_command(
    config: ConfigArg,
    systems: Annotated[
        str | None,
        typer.Option(
            "--systems", help="Comma-separated systems: prompt, rag, sft, sft+dpo, extra system names."
        ),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            "--judge", help="Judge model: a local model, an endpoint URL, or MODEL@URL (default eval.judge)."
        ),
    ] = None,
    max_items: Annotated[
        int | None,
        typer.Option("--max-items", min=1, help="Held-out items per persona x stage (default all)."),
    ] = None,
    wait: WaitOption = False,
    set_options: SetOption = None,
) -> None:
    """Answer the evaluation questions with every system, score them, and write eval/report.html.

    First, with no generation, how likely each system finds the persons' real held-out words: their
    NLL per token, the real passage against decoys, and under each stage's prompt (eval.likelihood).
    Then two sets: the persons' held-out own words (each passage's back-written question, scored against the
    real passage) and the annotator's held-out dialogues. Every metric comes with a paired bootstrap 95%
    interval; the summary marks differences to the baseline whose interval excludes 0. Systems whose
    models are missing are skipped with a note. Then every system answers the robustness probes built
    from the corpus (stage boundary, false premises, "you are an AI" pressure, push-back, user-emulator
    conversations; eval.robustness, off with --set eval.robustness.enabled=false). Every call is cached,
    so a re-run only generates what is new.

    Example: persllm eval examples/demo/persllm.yaml --systems prompt,sft --max-items 5
    """

    project = load(config, set_options)
    names = [name.strip() for name in systems.split(",") if name.strip()] if systems else None
    with writing(project, "eval", wait):
        result = evaluate.run(
            *EvalSettings.of_project(project),
            systems=names,
            judge=judge,
            max_items=max_items,
        )
    for name, reason in result["settings"]["skipped"].items():
        typer.echo(f"skipped {name}: {reason}", err=True)
    typer.echo(headline(project.layout.eval))


@app.command("report")
def report_command(config: ConfigArg, set_options: SetOption = None) -> None:
    """Rebuild eval/report.md and eval/report.html from the last evaluation's metrics and generations.

    Example: persllm report examples/demo/persllm.yaml
    """

    project = load(config, set_options)
    paths = report.run(project)
    for path in paths.values():
        typer.echo(str(path))
