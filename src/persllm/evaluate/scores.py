"""From generation rows to the metric tables of ``metrics.json``, with bootstrap intervals.

A row is one sample of one system for one item (see ``evaluate.run``). Rows come in two sets: ``golden``
(held-out annotator dialogues: the reference is the annotator's golden reply, the paper's setting) and
``heldout`` (the person's held-out own words: the reference is their real passage). Each metric is first
computed per row, then per item (the mean over its samples), then over items with a paired bootstrap:
every system is resampled with the same item draws, so "system - baseline" intervals are paired. Texts
are embedded once, with the project's embedder; everything else is the pure functions of ``metrics``.
"""

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from persllm import stats
from persllm.config import Workspace
from persllm.config.stages import EvalSettings
from persllm.evaluate import metrics
from persllm.index.retrieve import load_heldout
from persllm.persona import read_stage_chunks

Embed = Callable[[list[str]], np.ndarray]
SETS = {"golden": "overall", "heldout": "heldout"}  # row set -> its key in a system's metrics
MEAN_METRICS = ("rouge_l", "style_fidelity", "persona_acc", "stage_acc", "anachronism_rate")
PAIRED_METRICS = ("bleu", *MEAN_METRICS)
REFERENCE_METRICS = ("style_fidelity", "persona_acc", "stage_acc")


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


@dataclass
class Material:
    """What responses are scored against besides their references: later-only terms per (persona, stage)
    and the training style passages (own words, held-out ones excluded) with their persona and stage."""

    terms: dict[tuple[str, str], set[str]]
    style_texts: list[str]
    style_personas: list[str]
    style_stages: list[str]


def stage_material(settings: EvalSettings, workspace: Workspace) -> Material:
    """Later-only terms per (persona, stage), and every training style passage with its persona and stage."""

    material = Material({}, [], [], [])
    for persona_id, persona in workspace.personas.items():
        chunks = [
            read_stage_chunks(workspace, settings.corpus, persona_id, stage.id) for stage in persona.stages
        ]
        texts = [[chunk.text for chunk in stage_chunks] for stage_chunks in chunks]
        for index, stage in enumerate(persona.stages):
            earlier = [t for stage_texts in texts[: index + 1] for t in stage_texts]
            later = [t for stage_texts in texts[index + 1 :] for t in stage_texts]
            material.terms[(persona_id, stage.id)] = (
                metrics.later_only_terms(earlier, later) if later else set()
            )
            held = {chunk.text for chunk in load_heldout(workspace, persona_id, stage.id)}
            for chunk in chunks[index]:
                if chunk.kind == "style" and chunk.text not in held:
                    material.style_texts.append(chunk.text)
                    material.style_personas.append(persona_id)
                    material.style_stages.append(stage.id)
    return material


class Scorer:
    """Per-text scores against the training style passages: style fidelity, who and when (the classifier)."""

    def __init__(self, material: Material, vectors: Embeddings) -> None:
        self.material = material
        self.vectors = vectors
        self.style = vectors(material.style_texts) if material.style_texts else None
        self.owners = np.asarray(material.style_personas)

    def texts(self, texts: list[str], personas: list[str], stages: list[str]) -> dict[str, np.ndarray]:
        """``style_fidelity``, ``persona_acc`` and ``stage_acc`` (1/0) per text; NaN where undefined."""
        n = len(texts)
        out = {name: np.full(n, np.nan) for name in REFERENCE_METRICS}
        if self.style is None or n == 0:
            return out
        matrix = self.vectors(texts)
        for i, (vector, persona) in enumerate(zip(matrix, personas, strict=True)):
            value = metrics.style_fidelity(
                vector[None, :], [persona], self.style, self.material.style_personas
            )
            out["style_fidelity"][i] = np.nan if value is None else value
        who = metrics.nearest_centroid_predict(self.style, self.material.style_personas, matrix)
        if who is not None:
            out["persona_acc"] = (who == np.asarray(personas)).astype(float)
        for persona in set(personas):
            mine = np.flatnonzero(self.owners == persona)
            rows = [i for i, p in enumerate(personas) if p == persona]
            labels = [self.material.style_stages[j] for j in mine]
            when = metrics.nearest_centroid_predict(self.style[mine], labels, matrix[rows])
            if when is not None:
                out["stage_acc"][rows] = (when == np.asarray([stages[i] for i in rows])).astype(float)
        return out


def score(
    settings: EvalSettings,
    workspace: Workspace,
    rows: list[dict[str, Any]],
    embed: Embed,
    baseline: str,
    resamples: int = stats.RESAMPLES,
) -> dict[str, Any]:
    """Metrics of every system on each set, with intervals, differences to ``baseline`` and a reference row.

    Returns ``{"systems": {name: {"overall", "overall_ci", "by_stage", "heldout", "heldout_ci"}},
    "differences": {"overall" | "heldout": {name: {metric: estimate}}}, "reference": {...}}``; a set
    without rows is left out. ``reference`` scores the held-out passages themselves: the ceiling of
    style fidelity and identifiability that the person's real words reach.
    """
    vectors = Embeddings(embed)
    material = stage_material(settings, workspace)
    scorer = Scorer(material, vectors)
    seed = settings.seed
    systems: dict[str, dict[str, Any]] = {r["system"]: {} for r in rows}
    differences: dict[str, Any] = {}
    reference: dict[str, Any] = {}
    for set_name, key in SETS.items():
        set_rows = [r for r in rows if r.get("set", "golden") == set_name]
        if not set_rows:
            continue
        items = sorted({r["item"] for r in set_rows})
        indices = stats.resample_indices(len(items), resamples, seed)
        per_item: dict[str, dict[str, np.ndarray]] = {}
        for system in systems:
            system_rows = [r for r in set_rows if r["system"] == system]
            if not system_rows:
                continue
            per_item[system] = item_scores(system_rows, items, scorer, material)
            points, intervals = estimates(per_item[system], indices)
            pairs = distinction_estimates(system_rows, vectors, seed, resamples)
            points.update({name: e.value for name, e in pairs.items()})
            intervals.update({name: e.to_dict() for name, e in pairs.items()})
            points.update(health(system_rows))
            points.update(judge_scores(system_rows))
            systems[system][key] = points
            systems[system][f"{key}_ci"] = intervals
            if set_name == "golden":
                systems[system]["by_stage"] = by_stage(system_rows, material.terms)
        if baseline in per_item:
            differences[key] = {
                system: paired_differences(per_item[system], per_item[baseline], indices)
                for system in per_item
                if system != baseline
            }
        if set_name == "heldout":
            reference = reference_scores(set_rows, items, scorer, indices)
    return {"systems": systems, "differences": differences, "reference": reference}


def item_scores(
    rows: list[dict[str, Any]], items: list[str], scorer: Scorer, material: Material
) -> dict[str, np.ndarray]:
    """Each metric per item (``items`` order): the mean over the item's samples; BLEU as summed statistics."""
    responses = [r["response"] for r in rows]
    references = [r["reference"] for r in rows]
    per_row = scorer.texts(responses, [r["persona"] for r in rows], [r["stage"] for r in rows])
    per_row["rouge_l"] = np.asarray(metrics.rouge_l_each(responses, references), dtype=float)
    per_row["anachronism_rate"] = np.asarray([anachronism_flag(r, material.terms) for r in rows], dtype=float)
    bleu_rows = stats.bleu_statistics(responses, references)
    position = {item: i for i, item in enumerate(items)}
    where = np.asarray([position[r["item"]] for r in rows])
    result: dict[str, np.ndarray] = {}
    for name in MEAN_METRICS:
        total = np.zeros(len(items))
        count = np.zeros(len(items))
        finite = np.isfinite(per_row[name])
        np.add.at(total, where[finite], per_row[name][finite])
        np.add.at(count, where[finite], 1)
        result[name] = np.divide(total, count, out=np.full(len(items), np.nan), where=count > 0)
    summed = np.zeros((len(items), bleu_rows.shape[1]))
    np.add.at(summed, where, bleu_rows)
    result["bleu"] = summed
    return result


def anachronism_flag(row: dict[str, Any], terms: dict[tuple[str, str], set[str]]) -> float:
    """1.0 when the response uses a later-only term of its persona (noted on the row); NaN at a last stage."""
    later = terms.get((row["persona"], row["stage"]))
    if not later:
        return float("nan")
    found = metrics.anachronisms(row["response"], later, row["question"])
    row["anachronisms"] = found
    return float(bool(found))


def estimates(per_item: dict[str, np.ndarray], indices: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """(point values, intervals) of one system's per-item scores."""
    points: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    for name in PAIRED_METRICS:
        if name == "bleu":
            estimate = stats.bleu_estimate(per_item[name], indices)
        else:
            estimate = stats.mean_estimate(per_item[name], indices)
        points[name] = estimate.value
        intervals[name] = estimate.to_dict()
    return points, intervals


def paired_differences(
    system: dict[str, np.ndarray], baseline: dict[str, np.ndarray], indices: np.ndarray
) -> dict[str, Any]:
    """``system - baseline`` for every paired metric, with the same item draws on both sides."""
    result: dict[str, Any] = {}
    for name in PAIRED_METRICS:
        if name == "bleu":
            estimate = stats.bleu_difference(system[name], baseline[name], indices)
        else:
            estimate = stats.mean_difference(system[name], baseline[name], indices)
        result[name] = {**estimate.to_dict(), "excludes_zero": estimate.excludes_zero()}
    return result


def distinction_estimates(
    rows: list[dict[str, Any]], vectors: Embeddings, seed: int, resamples: int
) -> dict[str, stats.Estimate]:
    """Intra / Stage / Inter means with intervals from resampling the pairs."""
    responses = [r["response"] for r in rows]
    keys = [(r["persona"], r["stage"], r["item"]) for r in rows]
    values = metrics.distinction_values(responses, vectors(responses), keys, seed=seed)
    return {
        name: stats.mean_estimate(pair_values, stats.resample_indices(len(pair_values), resamples, seed))
        for name, pair_values in values.items()
    }


def reference_scores(
    rows: list[dict[str, Any]], items: list[str], scorer: Scorer, indices: np.ndarray
) -> dict[str, Any]:
    """The held-out passages themselves, scored like responses (one per item)."""
    first = {r["item"]: r for r in rows}
    chosen = [first[item] for item in items]
    per_item = scorer.texts(
        [r["reference"] for r in chosen], [r["persona"] for r in chosen], [r["stage"] for r in chosen]
    )
    found = {name: stats.mean_estimate(per_item[name], indices) for name in REFERENCE_METRICS}
    return {
        "heldout": {name: e.value for name, e in found.items()},
        "heldout_ci": {name: e.to_dict() for name, e in found.items()},
    }


def health(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Row count, share of empty responses, mean completion length."""
    responses = [r["response"] for r in rows]
    return {
        "n": len(rows),
        "empty_rate": float(np.mean([not r.strip() for r in responses])) if rows else None,
        "completion_tokens": metrics.mean_or_none(r.get("completion_tokens") for r in rows),
    }


def by_stage(rows: list[dict[str, Any]], terms: dict[tuple[str, str], set[str]]) -> dict[str, Any]:
    cells: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        cells[f"{row['persona']}/{row['stage']}"].append(row)
    return {
        cell: {**text_scores(cell_rows, terms), **judge_scores(cell_rows)}
        for cell, cell_rows in cells.items()
    }


def text_scores(rows: list[dict[str, Any]], terms: dict[tuple[str, str], set[str]]) -> dict[str, Any]:
    """Reference overlap, anachronisms and output health of some rows (point values, for the stage table)."""
    responses = [r["response"] for r in rows]
    references = [r["reference"] for r in rows]
    flags = [flag for flag in (anachronism_flag(r, terms) for r in rows) if not np.isnan(flag)]
    return {
        **health(rows),
        "bleu": metrics.bleu(responses, references),
        "rouge_l": metrics.rouge_l(responses, references),
        "anachronism_rate": metrics.anachronism_rate([bool(f) for f in flags]),
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
