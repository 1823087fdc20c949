"""Data commands: ``persllm curate`` (SFT datasets) and ``persllm pairs`` (DPO preference pairs)."""

from collections import Counter
from typing import Annotated, Any

import typer

from persllm import curate, pairs
from persllm.cli.app import ConfigArg, SetOption, WaitOption, app, load, writing
from persllm.cli.project import table
from persllm.config.stages import CurateSettings, PairsSettings

PersonaOption = Annotated[
    list[str] | None, typer.Option("--persona", "-p", help="Only this persona (repeatable); default: all.")
]


@app.command("curate")
def curate_command(
    config: ConfigArg, persona: PersonaOption = None, wait: WaitOption = False, set_options: SetOption = None
) -> None:
    """Validate, deduplicate, split and render the annotations as SFT data (data/<persona>/sft_*.jsonl).

    Example: persllm curate my-persona/persllm.yaml --persona wren --set curate.repeat=2
    """

    project = load(config, set_options)
    with writing(project, "curate", wait):
        result = curate.run(*CurateSettings.of_project(project), personas=persona or None)
    rows: list[dict[str, Any]] = []
    removed: Counter[str] = Counter()
    for persona_id, stats in result["personas"].items():
        removed.update(stats["removed"])
        rows.append(
            {
                "persona": persona_id,
                "input": stats["input"],
                "removed": stats["input"] - stats["kept"],
                "kept": stats["kept"],
                "train": stats["train"],
                "test": stats["test"],
                "train rows": stats["train_rows"],
                "general": stats["general_rows"],
            }
        )
    typer.echo(table(list(rows[0]) if rows else ["persona"], rows))
    reasons = ", ".join(f"{name} {count}" for name, count in removed.items() if count)
    typer.echo(f"removed: {reasons or 'none'}")
    typer.echo(f"data written to {project.layout.data}")


@app.command("pairs")
def pairs_command(
    config: ConfigArg, persona: PersonaOption = None, wait: WaitOption = False, set_options: SetOption = None
) -> None:
    """Build DPO preference pairs from the curated training side (data/<persona>/dpo_train.jsonl).

    Rejected answers come from another stage of the same persona, from another persona's reply to a
    similar input, and (with pairs.base_model) from the un-personified base model.

    Example: persllm pairs my-persona/persllm.yaml --set pairs.base_model=true
    """

    project = load(config, set_options)
    with writing(project, "pairs", wait):
        result = pairs.run(*PairsSettings.of_project(project), personas=persona or None)
    rows: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for persona_id, stats in result["personas"].items():
        row: dict[str, Any] = {"persona": persona_id, "sources": stats["sources"]}
        for provenance, counts in stats["provenance"].items():
            row[provenance] = counts["kept"]
            reasons = {k: v for k, v in counts.items() if k not in ("candidates", "kept")}
            dropped.update({f"{provenance} {k}": v for k, v in reasons.items()})
        row["dropped"] = sum(counts["candidates"] - counts["kept"] for counts in stats["provenance"].values())
        row["pairs"] = stats["pairs"]
        rows.append(row)
    typer.echo(table(list(rows[0]) if rows else ["persona"], rows))
    summary = ", ".join(f"{name} {count}" for name, count in dropped.items() if count)
    typer.echo(f"dropped: {summary or 'none'}")
    typer.echo(f"pairs written to {project.layout.data}")
