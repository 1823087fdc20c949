"""What a project's material yields: per persona, what will train and what will be evaluated.

Printed by ``persllm index`` and ``persllm run`` so that a user sees, before anything is annotated, whether
their targets will be the person's own words, real exchanges, or dialogues an annotator writes, and which
evaluation exists. The counts come from the index's per-stage rows and the annotate settings.
"""

from typing import Any

from persllm.config import Project
from persllm.jsonl import read_jsonl

BIOGRAPHY_ONLY = (
    "every training reply of {where} will be written by the annotator (no own words, no dialogue material): "
    "the bundled 135M annotator cannot write faithful ones; add the person's own words or real exchanges, "
    "or point `annotator` at a stronger model (docs/concepts.md, 'What your material yields')"
)


def stage_yield(project: Project, row: dict[str, Any]) -> dict[str, int]:
    """(own-words, real, annotator-written) training dialogues and (passages, exchanges) held out."""
    cfg = project.config.annotate
    counts = cfg.counts.model_dump()
    shares = cfg.own_words_shares(project.config.annotator.model)
    passages = row["style"]
    own = 0
    for kind, count in counts.items():
        taken = min(round(count * shares.get(kind, 0.0)), passages)
        own += taken
        passages -= taken
    return {
        "own_words": own,
        "real": row["exchanges"],
        "annotator": sum(counts.values()) - own if row["chunks"] else 0,
        "heldout_passages": row["heldout"],
        "heldout_exchanges": row["heldout_exchanges"],
    }


def material_lines(project: Project, rows: list[dict[str, Any]]) -> list[str]:
    """One line per persona (what trains, what is evaluated), then a warning per biography-only stage."""
    lines: list[str] = []
    warnings: list[str] = []
    for persona_id in dict.fromkeys(row["persona"] for row in rows):
        totals = {"own_words": 0, "real": 0, "annotator": 0, "heldout_passages": 0, "heldout_exchanges": 0}
        for row in (r for r in rows if r["persona"] == persona_id):
            found = stage_yield(project, row)
            totals = {key: totals[key] + found[key] for key in totals}
            if found["annotator"] and not found["own_words"] and not found["real"]:
                warnings.append("warning: " + BIOGRAPHY_ONLY.format(where=f"{persona_id}/{row['stage']}"))
        held = totals["heldout_passages"] + totals["heldout_exchanges"]
        evaluation = (
            f"evaluated on {totals['heldout_passages']} held-out passages and {totals['heldout_exchanges']} "
            "held-out real exchanges"
            if held
            else "no held-out evaluation (no own words or exchanges to hold out; only annotator test items)"
        )
        lines.append(
            f"{persona_id}: trains on up to {totals['own_words']} own-words dialogues, {totals['real']} real "
            f"exchanges and {totals['annotator']} annotator-written dialogues; {evaluation}"
        )
    return lines + warnings


def index_rows(project: Project) -> list[dict[str, Any]]:
    """The per-stage counts ``persllm index`` printed, read back from the run folder's index."""
    import json

    layout = project.layout
    rows = []
    for persona_id, persona in project.personas.items():
        for stage in persona.stages:
            meta_path = layout.index_meta(persona_id, stage.id)
            if not meta_path.exists():
                continue
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            rows.append(
                {
                    "persona": persona_id,
                    "stage": stage.id,
                    "chunks": meta.get("chunks", 0),
                    "style": meta.get("style", 0),
                    "heldout": len(read_jsonl(layout.heldout_chunks(persona_id, stage.id))),
                    "exchanges": len(read_jsonl(layout.exchanges(persona_id, stage.id))),
                    "heldout_exchanges": len(read_jsonl(layout.heldout_exchanges(persona_id, stage.id))),
                }
            )
    return rows
