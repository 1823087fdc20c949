"""Planning the dialogues to annotate: deterministic items with stable ids.

Seeds are drawn from a fixed permutation of each stage's chunks (seeded by ``project.config.seed``,
the persona, the stage and the kind), so raising a count only appends items: every earlier item keeps
its seed and id, and a re-run skips it.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass

from persllm.config import Project
from persllm.hashing import stable_hash
from persllm.persona.corpus import Chunk

KINDS = ("ordinary", "misleading", "opinion")
STANCE_ORDER = ("agree", "differ", "conflict")


@dataclass(frozen=True)
class Item:
    """One dialogue to annotate.

    Attributes:
        id: stable hash of persona, stage, kind, seed ref and index; the record's id.
        index: position among the stage's items of this kind; also the sample number of its calls,
            so two items on the same seed still get different generations.
        stance: for ``opinion`` items, whether the user agrees, differs or conflicts; else ''.
        follow_ups: generated follow-up user turns after the first exchange (0 = single turn).
    """

    id: str
    persona: str
    stage: str
    kind: str
    seed: Chunk
    index: int
    stance: str = ""
    follow_ups: int = 0


def item_id(persona: str, stage: str, kind: str, seed_ref: str, index: int) -> str:
    return stable_hash({"persona": persona, "stage": stage, "kind": kind, "seed": seed_ref, "index": index})


def unit(text: str) -> float:
    """A deterministic number in [0, 1) from a string."""
    return int(stable_hash(text, length=12), 16) / 16**12


def seed_order(chunks: list[Chunk], project_seed: int, persona: str, stage: str, kind: str) -> list[Chunk]:
    """The stage's chunks in the fixed, seeded order that seeds are taken from."""
    ordered = sorted(chunks, key=lambda chunk: chunk.ref)
    rng = random.Random(int(stable_hash([project_seed, persona, stage, kind], length=15), 16))
    rng.shuffle(ordered)
    return ordered


def make_item(
    persona: str, stage: str, kind: str, seed: Chunk, index: int, multi_turn_share: float, max_follow_ups: int
) -> Item:
    ident = item_id(persona, stage, kind, seed.ref, index)
    stance = STANCE_ORDER[int(unit(f"{ident}:stance") * len(STANCE_ORDER))] if kind == "opinion" else ""
    follow_ups = 0
    if max_follow_ups > 0 and unit(f"{ident}:multi") < multi_turn_share:
        follow_ups = 1 + int(unit(f"{ident}:turns") * max_follow_ups)
    return Item(ident, persona, stage, kind, seed, index, stance, follow_ups)


def plan_items(
    project: Project,
    chunks_of: Callable[[str, str], list[Chunk]],
    personas: list[str],
    stages: dict[str, list[str]],
) -> list[Item]:
    """Every item of the selected personas and stages, interleaved.

    The order is index-major (item 0 of every persona, stage and kind, then item 1, ...), so a
    ``limit`` takes a spread of stages and kinds rather than the first stage's ordinary questions.

    Args:
        chunks_of: ``(persona, stage) -> chunks`` that may seed a dialogue (the stage's own material).
        stages: persona id -> the stage ids to plan.
    """
    cfg = project.config.annotate
    counts = cfg.counts.model_dump()
    rows: list[tuple[int, int, Item]] = []
    position = 0
    for persona in personas:
        for stage in stages[persona]:
            chunks = chunks_of(persona, stage)
            if not chunks:
                continue
            for kind in KINDS:
                order = seed_order(chunks, project.config.seed, persona, stage, kind)
                for index in range(counts[kind]):
                    seed = order[index % len(order)]
                    item = make_item(
                        persona, stage, kind, seed, index, cfg.multi_turn_share, cfg.max_follow_ups
                    )
                    rows.append((index, position, item))
                    position += 1
    return [item for _, _, item in sorted(rows, key=lambda row: (row[0], row[1]))]
