"""``persllm pairs``: curated training records -> preference pairs in ``data/<persona>/dpo_train.jsonl``.

The chosen answer is the golden reply of a record's first exchange; rejected answers come from another
stage of the same persona (regenerated through the annotation engine, so the time is wrong), from
another persona's reply to the most similar input (never the same persona), and optionally from the
un-personified base model. Only the training side of the split is used, so no test item leaks.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from persllm.annotate.engine import Annotator
from persllm.config import Workspace
from persllm.config.stages import PairsSettings
from persllm.curate import load_annotations
from persllm.curate.filters import is_well_formed
from persllm.curate.stats import curated_format, update_stats
from persllm.errors import UserError
from persllm.index.encoder import embed
from persllm.index.retrieve import Retriever
from persllm.jsonl import read_jsonl, write_jsonl
from persllm.llm import CallCache, make_backend
from persllm.llm.base import run_sync
from persllm.manifest import record_stage
from persllm.pairs import sources
from persllm.pairs.build import OUTCOMES, PROVENANCES, Candidate, opening, pair_problem, pair_row

if TYPE_CHECKING:
    from persllm.llm.base import ChatBackend


def run(settings: PairsSettings, workspace: Workspace, personas: list[str] | None = None) -> dict[str, Any]:
    """Build the preference pairs of ``personas`` (default: all).

    Returns:
        ``pairs`` (the total written), kept pairs per provenance, and under ``personas`` each
        persona's ``pairs`` entry of ``stats.json``.
    """
    import numpy as np

    cfg = settings.pairs
    started = time.monotonic()
    persona_ids = list(dict.fromkeys(personas or workspace.personas))
    for persona_id in persona_ids:
        workspace.persona(persona_id)
        sft_train = workspace.layout.sft_train(persona_id)
        if not sft_train.exists():
            raise UserError(f"{sft_train}: persona {persona_id!r} is not curated; run `persllm curate` first")

    # Sources: every curated persona's training side (the others supply cross-persona neighbours).
    train = {
        pid: train_records(workspace, pid)
        for pid in workspace.personas
        if workspace.layout.sft_train(pid).exists()
    }

    # Rejected answers from each enabled source.
    candidates: list[Candidate] = []
    if cfg.cross_persona or cfg.cross_stage:
        every = embed([opening(r)[0] for records in train.values() for r in records], settings.embedder)
        ends = list(accumulate(len(records) for records in train.values()))
        vectors = dict(zip(train, np.split(every, ends[:-1]), strict=True))
        bounds = (cfg.similarity_min, cfg.similarity_max)
        if cfg.cross_persona:
            candidates += sources.cross_persona(train, persona_ids, vectors, *bounds)
        if cfg.cross_stage:
            candidates += sources.cross_stage_neighbours(train, persona_ids, vectors, *bounds)
    if cfg.cross_stage or cfg.base_model:
        candidates += run_sync(regenerate(settings, workspace, {pid: train[pid] for pid in persona_ids}))

    # Filter, render and write, persona by persona.
    summary: dict[str, Any] = {}
    for persona_id in persona_ids:
        persona = workspace.persona(persona_id)
        layout = workspace.layout
        cot, style = curated_format(layout.stats(persona_id), settings.curate)
        counts = {provenance: Counter[str]() for provenance in PROVENANCES}
        rows = []
        mine = [c for c in candidates if c.record["persona"] == persona_id]
        for candidate in sorted(mine, key=order):
            tally = counts[candidate.provenance]
            tally["candidates"] += 1
            if candidate.rejected is None:
                tally["unavailable"] += 1
                continue
            if candidate.provenance == "cross_persona" and candidate.rejected_from["persona"] == persona_id:
                raise AssertionError(f"cross-persona pair of {persona_id!r} rejects its own persona")
            problem = pair_problem(opening(candidate.record)[2], candidate.rejected[1], cfg.min_difference)
            if problem:
                tally[problem] += 1
                continue
            tally["kept"] += 1
            rows.append(pair_row(candidate, persona, cot, style))
        write_jsonl(layout.dpo_train(persona_id), rows)
        stats = {
            "sources": len(train[persona_id]),
            "pairs": len(rows),
            "provenance": {p: {k: counts[p][k] for k in OUTCOMES} for p in PROVENANCES},
        }
        update_stats(layout.stats(persona_id), "pairs", stats)
        summary[persona_id] = stats

    # Manifest: what pairing did; `persllm run` keeps its own fingerprint of the stage.
    totals: dict[str, Any] = {"pairs": sum(s["pairs"] for s in summary.values())}
    for provenance in PROVENANCES:
        totals[provenance] = sum(s["provenance"][provenance]["kept"] for s in summary.values())
    record_stage(
        workspace,
        "pairs",
        status="done" if set(persona_ids) == set(workspace.personas) else "partial",
        seconds=round(time.monotonic() - started, 3),
        counts=totals,
    )
    return {**totals, "personas": summary}


def train_records(workspace: Workspace, persona_id: str) -> list[dict[str, Any]]:
    """The annotation records on the training side of a persona's curated split, sorted by id."""
    rows = read_jsonl(workspace.layout.sft_train(persona_id))
    ids = {row["meta"]["id"] for row in rows if row.get("meta", {}).get("kind") != "general"}
    chosen: dict[str, dict[str, Any]] = {}
    for record in load_annotations(workspace, persona_id):
        if record.get("id") in ids and record["id"] not in chosen and is_well_formed(record):
            chosen[record["id"]] = {**record, "persona": persona_id}
    return [chosen[key] for key in sorted(chosen)]


async def regenerate(
    settings: PairsSettings, workspace: Workspace, train: dict[str, list[dict[str, Any]]]
) -> list[Candidate]:
    """Cross-stage replies (annotation engine) and base-model replies, all cached in the run's SQLite."""

    cfg = settings.pairs
    cache = CallCache(workspace.layout.cache)
    backends: list[ChatBackend] = []
    try:
        jobs: list[Coroutine[Any, Any, list[Candidate]]] = []
        regenerated = {pid: [r for r in records if not sources.is_own(r)] for pid, records in train.items()}
        if cfg.cross_stage and any(
            len(workspace.persona(pid).stages) > 1 and records for pid, records in regenerated.items()
        ):
            backends.append(make_backend(settings.annotator, cache, tag="pairs"))
            retriever = Retriever(workspace, settings.embedder, settings.retrieval)
            annotator = Annotator(workspace, settings.annotator, settings.annotate, backends[-1], retriever)
            for pid, records in regenerated.items():
                jobs.append(
                    sources.cross_stage(annotator, workspace.persona(pid), records, cfg.cross_stage_max)
                )
        if cfg.base_model:
            backends.append(make_backend(settings.base_model, cache, tag="pairs-base"))
            jobs += [sources.base_model(backends[-1], records) for records in train.values()]
        results = [candidate for batch in await asyncio.gather(*jobs) for candidate in batch]
    finally:
        for backend in backends:
            await backend.aclose()
        cache.close()
    return results


def order(candidate: Candidate) -> tuple[str, int, str, str]:
    """Deterministic row order: by source record, provenance, then where the rejected answer came from."""
    source = candidate.rejected_from
    return (
        candidate.record["id"],
        PROVENANCES.index(candidate.provenance),
        str(source.get("persona")),
        str(source.get("stage")),
    )
