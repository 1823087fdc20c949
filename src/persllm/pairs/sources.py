"""Where rejected answers come from: another stage (regenerated), another persona (a neighbour's reply),
the un-personified base model. Every model call goes through the project's call cache."""

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from persllm.annotate.parse import Malformed
from persllm.curate.dedup import COSINE_TOLERANCE
from persllm.curate.filters import REAL_SOURCES, reply_source
from persllm.pairs.build import Candidate, opening, other_stages
from persllm.prompting import split_inline

if TYPE_CHECKING:
    from persllm.annotate.engine import Annotator
    from persllm.config import PersonaConfig
    from persllm.llm.base import ChatBackend

Records = dict[str, list[dict[str, Any]]]


def nearest_in_range(
    queries: npt.NDArray[np.float32],
    others: npt.NDArray[np.float32],
    low: float,
    high: float,
    block: int = 4096,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """For each query row: the most similar row of ``others`` with cosine in [low, high].

    Returns (index, cosine); index is -1 (cosine -inf) where no row lies in the range. Rows are unit vectors;
    the bounds allow ``COSINE_TOLERANCE`` of float rounding, so ``high=1.0`` admits a word-for-word repeat.
    """
    index = np.full(len(queries), -1, dtype=np.int64)
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    if len(others) == 0:
        return index, best
    for start in range(0, len(queries), block):
        sims = queries[start : start + block] @ others.T
        sims[(sims < low - COSINE_TOLERANCE) | (sims > high + COSINE_TOLERANCE)] = -np.inf
        top = sims.argmax(axis=1)
        value = sims[np.arange(len(top)), top]
        index[start : start + len(top)] = np.where(np.isfinite(value), top, -1)
        best[start : start + len(top)] = value
    return index, best


def cross_persona(
    train: Records,
    persona_ids: list[str],
    vectors: dict[str, npt.NDArray[np.float32]],
    low: float,
    high: float,
) -> list[Candidate]:
    """Each record of ``persona_ids`` against the most similar input of any *other* persona."""
    candidates: list[Candidate] = []
    for persona_id in persona_ids:
        other_ids = [other for other in train if other != persona_id]
        pool = [record for other in other_ids for record in train[other]]
        others = (
            np.concatenate([vectors[o] for o in other_ids]) if other_ids else np.zeros((0, 0), np.float32)
        )
        records = list(zip(train[persona_id], vectors[persona_id], strict=True))
        candidates += neighbour_candidates("cross_persona", records, pool, others, low, high)
    return candidates


def cross_stage_neighbours(
    train: Records,
    persona_ids: list[str],
    vectors: dict[str, npt.NDArray[np.float32]],
    low: float,
    high: float,
) -> list[Candidate]:
    """Own-words records against the most similar own-words input of the same persona at another stage.

    Both answers are the person's real words; only the stage differs, which is what the pair teaches.
    Regenerating the reply as another stage would put annotator text against the person's own.
    """
    candidates: list[Candidate] = []
    for persona_id in persona_ids:
        own = [(r, v) for r, v in zip(train[persona_id], vectors[persona_id], strict=True) if is_own(r)]
        for stage in sorted({r["stage"] for r, _ in own}):
            pool = [(r, v) for r, v in own if r["stage"] != stage]
            others = np.stack([v for _, v in pool]) if pool else np.zeros((0, 0), np.float32)
            here = [(r, v) for r, v in own if r["stage"] == stage]
            candidates += neighbour_candidates("cross_stage", here, [r for r, _ in pool], others, low, high)
    return candidates


def neighbour_candidates(
    provenance: str,
    records: list[tuple[dict[str, Any], npt.NDArray[np.float32]]],
    pool: list[dict[str, Any]],
    others: npt.NDArray[np.float32],
    low: float,
    high: float,
) -> list[Candidate]:
    """Each (record, input vector) with the reply of its most similar ``pool`` input as rejected answer."""
    if not records:
        return []
    queries = np.stack([vector for _, vector in records])
    index, sims = nearest_in_range(queries, others, low, high)
    candidates: list[Candidate] = []
    for (record, _), match, sim in zip(records, index.tolist(), sims.tolist(), strict=True):
        if match < 0:
            candidates.append(Candidate(provenance, record, None))
            continue
        neighbour = pool[match]
        _, analysis, response = opening(neighbour)
        source = {
            "persona": neighbour["persona"],
            "stage": neighbour["stage"],
            "id": neighbour["id"],
            "similarity": round(sim, 4),
        }
        candidates.append(Candidate(provenance, record, (analysis, response), source))
    return candidates


def is_own(record: dict[str, Any]) -> bool:
    """The person's real reply (own words or a real exchange): its pairs come from neighbours, never from
    the annotator regenerating it (that would teach "prefer real text", not "prefer the right stage")."""
    return reply_source(record) in REAL_SOURCES


async def cross_stage(
    annotator: "Annotator", persona: "PersonaConfig", records: list[dict[str, Any]], limit: int
) -> list[Candidate]:
    """Each annotator record's input answered by the same persona as up to ``limit`` other stages (no seed).

    Own-words records get their cross-stage pairs from ``cross_stage_neighbours`` instead.
    """

    async def one(record: dict[str, Any], stage_id: str) -> Candidate:
        source = {"persona": persona.id, "stage": stage_id}
        turns = [{"role": "user", "content": opening(record)[0]}]
        try:
            reply = await annotator.reply(persona.id, stage_id, turns, seed=None)
        except Malformed:
            return Candidate("cross_stage", record, None, source)
        return Candidate("cross_stage", record, (reply.analysis, reply.content), source)

    jobs = [
        one(r, stage) for r in records if not is_own(r) for stage in other_stages(persona, r["stage"], limit)
    ]
    return list(await asyncio.gather(*jobs))


async def base_model(backend: "ChatBackend", records: list[dict[str, Any]]) -> list[Candidate]:
    """Each record's input answered by the base model with no system prompt, label or context."""

    async def one(record: dict[str, Any]) -> Candidate:
        completion = await backend.generate([{"role": "user", "content": opening(record)[0]}], {})
        analysis, response = split_inline(completion.text)
        source = {"persona": None, "stage": None, "model": backend.model_id}
        return Candidate("base_model", record, (analysis, response) if response.strip() else None, source)

    return list(await asyncio.gather(*(one(r) for r in records)))
