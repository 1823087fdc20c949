"""``persllm run``: the whole pipeline, skipping what is unchanged."""

import json
from pathlib import Path
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

    project = load(config, set_options, preset=preset)
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


HEADLINE_KEYS = (
    "bleu",
    "rouge_l",
    "intra_bleu",
    "inter_bleu",
    "persona_acc",
    "style_fidelity",
    "anachronism_rate",
)


def headline(eval_dir: Path) -> str:
    """The report path, a few overall metrics per system, and the personified model minus the baseline."""
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.exists():
        return "no evaluation yet (run with --to eval)"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    overall = {name: data.get("overall", {}) for name, data in metrics.get("systems", {}).items()}
    rows = [(name, [values.get(k) for k in HEADLINE_KEYS], False) for name, values in overall.items()]
    baseline = metrics.get("settings", {}).get("baseline", "prompt")
    personified = next((name for name in ("sft+dpo", "sft") if name in overall), None)
    if baseline in overall and personified is not None:
        best, base = overall[personified], overall[baseline]
        deltas = [
            best[k] - base[k] if all(isinstance(d.get(k), int | float) for d in (best, base)) else None
            for k in HEADLINE_KEYS
        ]
        rows.append((f"{personified} - {baseline}", deltas, True))
    first = max(len(name) for name, _, _ in [("system", [], False), *rows]) + 2
    widths = [max(len(k), 7) + 2 for k in HEADLINE_KEYS]
    lines = [f"report: {eval_dir / 'report.html'}"]
    lines.append(
        f"{'system':<{first}}" + "".join(f"{k:>{w}}" for k, w in zip(HEADLINE_KEYS, widths, strict=True))
    )
    for name, values, signed in rows:
        cells = (_cell(v, w, signed) for v, w in zip(values, widths, strict=True))
        lines.append(f"{name:<{first}}" + "".join(cells))
    return "\n".join(lines)


def _cell(value: object, width: int, signed: bool) -> str:
    if not isinstance(value, int | float):
        return f"{'-':>{width}}"
    return f"{value:>+{width}.3f}" if signed else f"{value:>{width}.3f}"
