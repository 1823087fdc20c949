"""``persllm run``: the whole pipeline, skipping what is unchanged."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from persllm import metric_catalog, pipeline
from persllm.cli.app import ConfigArg, SetOption, WaitOption, app, load, writing
from persllm.evaluate.report import judge_validity_line
from persllm.metric_catalog import HEADLINE, fmt_estimate
from persllm.persona.yields import index_rows, material_lines


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
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Go on when a stage still misses items after a second try (the manifest records it).",
        ),
    ] = False,
    wait: WaitOption = False,
    set_options: SetOption = None,
) -> None:
    """Run index -> annotate -> curate -> pairs -> sft -> dpo -> eval, skipping unchanged stages.

    Stages: index, annotate, curate, pairs, sft, dpo, eval. Every setting they use is checked first.
    A stage that misses items (model errors) is tried again; if items are still missing the run stops
    with exit code 3 (`persllm failures CONFIG` lists them) unless --allow-partial. Ctrl-C (or SIGTERM)
    at any point stops within seconds; a re-run continues.

    Example: persllm run examples/demo/persllm.yaml --preset large
    """

    project = load(config, set_options, preset=preset)
    with writing(project, "run", wait):
        results = pipeline.run(
            project,
            start,
            stop,
            on_stage=lambda name, status: stage_line(project, name, status),
            allow_partial=allow_partial,
        )
    typer.echo(pipeline.format_summary(results))
    typer.echo(f"run folder: {project.run_dir}")
    typer.echo(headline(project.layout.eval))
    for line in dpo_lines(project):
        typer.echo(line)
    first = next(iter(project.personas.values()))
    typer.echo(
        f"chat with the result: persllm chat {project.config_path} --persona {first.id} "
        f"--stage {first.stages[-1].id} --model dpo"
    )


def stage_line(project: Any, name: str, status: str) -> None:
    """A stage starting (or skipped); once the index exists, what the material yields, before annotating."""
    typer.echo(f"[{name}] {status}", err=True)
    if name == "annotate" and status in ("running", "resuming", "skipped"):
        for line in material_lines(project, index_rows(project)):
            typer.echo(f"  {line}", err=True)


SETS = (("heldout", "held-out real words"), ("overall", "annotator-golden (the paper's setting)"))


def headline(eval_dir: Path) -> str:
    """The report path and, per evaluation set, every system's headline metrics with 95% intervals and
    the personified model minus the baseline (``*``: the interval excludes 0)."""

    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.exists():
        return "no evaluation yet (run with --to eval)"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    systems = metrics.get("systems", {})
    baseline = metrics.get("settings", {}).get("baseline", "prompt")
    lines = [f"report: {eval_dir / 'report.html'}"]
    lines += likelihood_lines(metrics.get("likelihood") or {}, baseline)
    for key, title in SETS:
        names = [name for name, data in systems.items() if key in data]
        if not names:
            continue
        personified = personified_of(names)
        difference = metrics.get("differences", {}).get(key, {}).get(personified or "", {})
        header = [*names, f"{personified} - {baseline}"] if difference else names
        table = [["metric", *header]]
        for metric in HEADLINE:
            cells = [fmt_estimate(systems[name].get(f"{key}_ci", {}).get(metric)) for name in names]
            if difference:
                cells.append(difference_cell(difference.get(metric)))
            if any(cell != "–" for cell in cells):
                table.append([metric, *cells])
        counts = metrics.get("counts", {})
        n_items = counts.get("heldout_items" if key == "heldout" else "golden_items")
        real = (
            f" ({counts['heldout_exchanges']} of them real exchanges)"
            if key == "heldout" and counts.get("heldout_exchanges")
            else ""
        )
        lines.append(f"\n{title}: {n_items} items{real}, 95% paired bootstrap intervals (* excludes 0)")
        lines += aligned(table)
    if metrics.get("judge_validity"):
        lines += ["", judge_validity_line(metrics["judge_validity"])]
    lines += robustness_lines(metrics.get("robustness") or {}, baseline)
    return "\n".join(lines)


def personified_of(names: list[str]) -> str | None:
    """The trained system a summary compares with the baseline: sft+dpo, else sft."""
    return next((name for name in ("sft+dpo", "sft") if name in names), None)


def difference_cell(estimate: dict[str, Any] | None) -> str:
    """A signed difference with its interval, ``*`` where the interval excludes 0."""

    mark = " *" if estimate and estimate.get("excludes_zero") else ""
    return fmt_estimate(estimate, signed=True) + mark


def aligned(table: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) + 2 for i in range(len(table[0]))]
    return [
        "".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table
    ]


def dpo_lines(project: Any) -> list[str]:
    """Per persona, whether DPO learnt: its reward accuracy and margin on held-out pairs."""

    lines = []
    for persona_id in project.personas:
        path = project.layout.model(persona_id, "dpo") / "training.json"
        if not path.exists():
            continue
        held = json.loads(path.read_text(encoding="utf-8")).get("heldout_pairs") or {}
        if "accuracy" in held:
            verdict = "learnt" if held["accuracy"].get("above_chance") else "not shown to learn"
            lines.append(
                f"dpo {persona_id}: {held['pairs']} held-out pairs, reward accuracy "
                f"{fmt_estimate(held['accuracy'])} (chance 0.5), margin {fmt_estimate(held['margin'])}: "
                f"{verdict}"
            )
        elif held:
            lines.append(f"dpo {persona_id}: no held-out reward ({held.get('skipped')})")
    return ["", *lines] if lines else []


def likelihood_lines(likelihood: dict[str, Any], baseline: str) -> list[str]:
    """The likelihood metrics per system with chance beside them, and the personified model minus the
    baseline: what the summary leads with."""

    systems = likelihood.get("systems") or {}
    if not systems:
        return []
    names = list(systems)
    personified = personified_of(names)
    difference = (likelihood.get("differences") or {}).get(personified or "", {})
    chance = likelihood.get("chance") or {}
    table = [["metric", *names, "chance", *([f"{personified} - {baseline}"] if difference else [])]]
    for metric in metric_catalog.names("likelihood"):
        cells = [fmt_estimate(systems[name].get(metric)) for name in names]
        level = chance.get(metric)
        cells.append("–" if level is None else f"{level:.3f}")
        if difference:
            cells.append(difference_cell(difference.get(metric)))
        if any(cell != "–" for cell in cells[: len(names)]):
            table.append(
                [
                    metric
                    + (" (lower better)" if metric in metric_catalog.lower_is_better("likelihood") else ""),
                    *cells,
                ]
            )
    items = (likelihood.get("counts") or {}).get("items")
    title = (
        f"\nlikelihood of the real held-out words: {items} passages, each system scoring the real passage "
        "against decoys and under every stage; 95% paired bootstrap intervals (* excludes 0)"
    )
    return [title, *aligned(table)]


def robustness_lines(robustness: dict[str, Any], baseline: str) -> list[str]:
    """The robustness probes' metrics per system, and the personified model minus the baseline."""

    systems = robustness.get("systems") or {}
    if not systems:
        return []
    names = list(systems)
    personified = personified_of(names)
    difference = (robustness.get("differences") or {}).get(personified or "", {})
    table = [["metric", *names, *([f"{personified} - {baseline}"] if difference else [])]]
    for metric in metric_catalog.names("robustness"):
        cells = [fmt_estimate(systems[name]["metrics"].get(metric)) for name in names]
        if difference:
            cells.append(difference_cell(difference.get(metric)))
        if any(cell != "–" for cell in cells):
            table.append(
                [
                    metric
                    + (" (lower better)" if metric in metric_catalog.lower_is_better("robustness") else ""),
                    *cells,
                ]
            )
    probes = sum((robustness.get("counts") or {}).values())
    errors = sum(data.get("errors", 0) for data in systems.values())
    title = (
        f"\nrobustness: {probes} corpus-built probes per system ({errors} failed), 95% bootstrap intervals"
    )
    return [title, *aligned(table)]
