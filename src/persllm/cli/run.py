"""``persllm run``: the whole pipeline, skipping what is unchanged."""

from typing import Annotated

import typer

from persllm.cli.app import ConfigArg, SetOption, app, load


@app.command("run")
def run_command(
    config: ConfigArg,
    start: Annotated[
        str | None, typer.Option("--from", help="First stage; it re-runs even if unchanged (index ... eval).")
    ] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    set_options: SetOption = None,
) -> None:
    """Run index -> annotate -> curate -> pairs -> sft -> dpo -> eval, skipping unchanged stages.

    Stages: index, annotate, curate, pairs, sft, dpo, eval. Ctrl-C at any point; a re-run continues.

    Example: persllm run examples/demo/persllm.yaml --to curate
    """
    from persllm import pipeline

    project = load(config, set_options)
    results = pipeline.run(
        project, start, stop, on_stage=lambda name, status: typer.echo(f"[{name}] {status}", err=True)
    )
    typer.echo(pipeline.format_summary(results))
    typer.echo(f"run folder: {project.run_dir}")
