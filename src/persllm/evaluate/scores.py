"""From generation rows to the metric tables of ``metrics.json``.

A row is one sample of one system for one item (see ``evaluate.run``). Texts are embedded once, with
the project's embedder; everything else is the pure functions of ``metrics``.
"""

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from persllm.config import Project
from persllm.evaluate import metrics

Embed = Callable[[list[str]], np.ndarray]


class Embeddings:
    """Unit vectors of texts, each distinct text encoded once."""

    def __init__(self, embed: Embed) -> None:
        self._embed = embed
        self._vectors: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            for text, vector in zip(missing, self._embed(missing), strict=True):
                self._vectors[text] = vector
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])


def stage_material(project: Project) -> tuple[dict[tuple[str, str], set[str]], list[str], list[str]]:
    """Later-only terms per (persona, stage), and all style chunks with their personas."""
    from persllm.persona import read_stage_chunks

    terms: dict[tuple[str, str], set[str]] = {}
    style_texts: list[str] = []
    style_personas: list[str] = []
    for persona_id, persona in project.personas.items():
        chunks = [read_stage_chunks(project, persona_id, stage.id) for stage in persona.stages]
        texts = [[chunk.text for chunk in stage_chunks] for stage_chunks in chunks]
        for index, stage in enumerate(persona.stages):
            earlier = [t for stage_texts in texts[: index + 1] for t in stage_texts]
            later = [t for stage_texts in texts[index + 1 :] for t in stage_texts]
            terms[(persona_id, stage.id)] = metrics.later_only_terms(earlier, later) if later else set()
        for chunk in (c for stage_chunks in chunks for c in stage_chunks if c.kind == "style"):
            style_texts.append(chunk.text)
            style_personas.append(persona_id)
    return terms, style_texts, style_personas


def score(project: Project, rows: list[dict[str, Any]], embed: Embed) -> dict[str, Any]:
    """Metrics per system: ``overall`` and ``by_stage`` (``"persona/stage"``) tables."""
    vectors = Embeddings(embed)
    terms, style_texts, style_personas = stage_material(project)
    style_matrix = vectors(style_texts) if style_texts else None

    # Golden centroids for identifiability: one reference per item.
    golden = {row["item"]: row for row in rows}
    ref_rows = list(golden.values())
    ref_matrix = vectors([r["reference"] for r in ref_rows])
    ref_persona = [r["persona"] for r in ref_rows]
    ref_stage = [f"{r['persona']}/{r['stage']}" for r in ref_rows]

    by_system: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_system[row["system"]].append(row)
    result: dict[str, Any] = {}
    for system, system_rows in by_system.items():
        matrix = vectors([r["response"] for r in system_rows])
        overall = text_scores(system_rows, terms)
        overall.update(
            metrics.distinction(
                [r["response"] for r in system_rows],
                matrix,
                [(r["persona"], r["stage"], r["item"]) for r in system_rows],
                seed=project.config.seed,
            )
        )
        overall["persona_acc"] = metrics.nearest_centroid_accuracy(
            ref_matrix, ref_persona, matrix, [r["persona"] for r in system_rows]
        )
        overall["stage_acc"] = metrics.nearest_centroid_accuracy(
            ref_matrix, ref_stage, matrix, [f"{r['persona']}/{r['stage']}" for r in system_rows]
        )
        overall["style_fidelity"] = (
            metrics.style_fidelity(matrix, [r["persona"] for r in system_rows], style_matrix, style_personas)
            if style_matrix is not None
            else None
        )
        overall.update(judge_scores(system_rows))
        cells: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in system_rows:
            cells[f"{row['persona']}/{row['stage']}"].append(row)
        by_stage = {
            cell: {**text_scores(cell_rows, terms), **judge_scores(cell_rows)}
            for cell, cell_rows in cells.items()
        }
        result[system] = {"overall": overall, "by_stage": by_stage}
    return result


def text_scores(rows: list[dict[str, Any]], terms: dict[tuple[str, str], set[str]]) -> dict[str, Any]:
    """Reference overlap, anachronisms and output health of some rows."""
    responses = [r["response"] for r in rows]
    references = [r["reference"] for r in rows]
    flags: list[bool] = []
    for row in rows:
        later = terms.get((row["persona"], row["stage"]))
        if later:
            found = metrics.anachronisms(row["response"], later, row["question"])
            row["anachronisms"] = found
            flags.append(bool(found))
    return {
        "n": len(rows),
        "bleu": metrics.bleu(responses, references),
        "rouge_l": metrics.rouge_l(responses, references),
        "anachronism_rate": metrics.anachronism_rate(flags),
        "empty_rate": float(np.mean([not r.strip() for r in responses])) if rows else None,
        "completion_tokens": metrics.mean_or_none(r.get("completion_tokens") for r in rows),
    }


def judge_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means of the judge's verdicts stored on rows (absent when nothing was judged)."""
    verdicts = [r["judge"] for r in rows if r.get("judge")]
    if not verdicts:
        return {}
    scores: dict[str, Any] = {
        "knowledge": metrics.mean_or_none(v.get("knowledge") for v in verdicts),
        "attitude": metrics.mean_or_none(v.get("attitude") for v in verdicts),
        "premise_detected": metrics.mean_or_none(
            float(v["premise_detected"]) for v in verdicts if v.get("premise_detected") is not None
        ),
    }
    outcomes = [v["preference"] for v in verdicts if "preference" in v]
    if outcomes:
        for outcome in ("win", "tie", "loss"):
            scores[f"{outcome}_rate"] = outcomes.count(outcome) / len(outcomes)
    return scores
