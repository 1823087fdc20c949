"""``persllm run``: the whole pipeline, skipping what is unchanged."""

import json
from pathlib import Path
from typing import Annotated

import typer

from persllm.cli.app import ConfigArg, SetOption, app, load
from persllm.errors import UserError


@app.command("run")
def run_command(
    config: ConfigArg,
    start: Annotated[
        str | None, typer.Option("--from", help="First stage; it re-runs even if unchanged (index ... eval).")
    ] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Apply a named preset from the project's `presets:` block.")
    ] = None,
    set_options: SetOption = None,
) -> None:
    """Run index -> annotate -> curate -> pairs -> sft -> dpo -> eval, skipping unchanged stages.

    Stages: index, annotate, curate, pairs, sft, dpo, eval. Ctrl-C at any point; a re-run continues.

    Example: persllm run examples/demo/persllm.yaml --preset large
    """
    from persllm import pipeline

    project = load(config, set_options)
    if preset is not None:
        presets = project.config.presets
        if preset not in presets:
            known = ", ".join(presets) or "none defined"
            raise UserError(
                f"{project.config_path}: presets: no preset {preset!r} (known: {known}); add it or fix it"
            )
        overrides = [f"{key}={value}" for key, value in presets[preset].items()]
        project = load(config, [*overrides, *(set_options or [])])
    results = pipeline.run(
        project, start, stop, on_stage=lambda name, status: typer.echo(f"[{name}] {status}", err=True)
    )
    typer.echo(pipeline.format_summary(results))
    typer.echo(f"run folder: {project.run_dir}")
    typer.echo(headline(project.run_dir / "eval"))
    first = next(iter(project.personas.values()))
    typer.echo(
        f"chat with the result: persllm chat {project.config_path} --persona {first.id} "
        f"--stage {first.stages[-1].id} --model dpo"
    )


def headline(eval_dir: Path) -> str:
    """The report path and a few overall metrics per system, personified against the prompt baseline."""
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.exists():
        return "no evaluation yet (run with --to eval)"
    systems = json.loads(metrics_path.read_text(encoding="utf-8")).get("systems", {})
    keys = (
        "bleu",
        "rouge_l",
        "intra_bleu",
        "inter_bleu",
        "persona_acc",
        "style_fidelity",
        "anachronism_rate",
    )
    lines = [f"report: {eval_dir / 'report.html'}", "system    " + "  ".join(f"{k:>16}" for k in keys)]
    for name, data in systems.items():
        overall = data.get("overall", {})
        cells = [overall.get(k) for k in keys]
        lines.append(
            f"{name:<10}"
            + "  ".join(f"{c:>16.3f}" if isinstance(c, float | int) else f"{'-':>16}" for c in cells)
        )
    return "\n".join(lines)
