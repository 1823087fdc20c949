"""Planning the dialogues to annotate: deterministic items with stable ids.

Seeds are drawn from a fixed permutation of each stage's chunks (seeded by the project's ``seed``,
the persona, the stage and the kind), so raising a count only appends items: every earlier item keeps
its seed and id, and a re-run skips it.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass

from persllm.config.stages import AnnotateSettings
from persllm.hashing import stable_hash
from persllm.persona.corpus import Chunk

KINDS = ("ordinary", "misleading", "opinion")
OWN_WORDS_KINDS = ("ordinary", "opinion")
STANCE_ORDER = ("agree", "differ", "conflict")
# Where an item's reply comes from: the annotator writes it, or it is the person's own passage (the seed),
# either training material (own_words) or a held-out passage the evaluation compares with (heldout).
SOURCES = ("annotator", "own_words", "heldout")


@dataclass(frozen=True)
class Item:
    """One dialogue to annotate.

    Attributes:
        id: stable hash of persona, stage, kind, seed ref and index; the record's id.
        index: position among the stage's items of this kind; also the sample number of its calls,
            so two items on the same seed still get different generations.
        stance: for ``opinion`` items, whether the user agrees, differs or conflicts; else ''.
        follow_ups: generated follow-up user turns after the first exchange (0 = single turn).
        source: ``annotator``, ``own_words`` or ``heldout`` (see ``SOURCES``).
    """

    id: str
    persona: str
    stage: str
    kind: str
    seed: Chunk
    index: int
    stance: str = ""
    follow_ups: int = 0
    source: str = "annotator"


def item_id(persona: str, stage: str, kind: str, seed_ref: str, index: int, source: str = "annotator") -> str:
    key: dict[str, object] = {
        "persona": persona,
        "stage": stage,
        "kind": kind,
        "seed": seed_ref,
        "index": index,
    }
    if source != "annotator":  # annotator items keep the ids they had before there were other sources
        key["source"] = source
    return stable_hash(key)


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
    settings: AnnotateSettings,
    chunks_of: Callable[[str, str], list[Chunk]],
    personas: list[str],
    stages: dict[str, list[str]],
) -> list[Item]:
    """Every item of the selected personas and stages, interleaved.

    The order is index-major (item 0 of every persona, stage and kind, then item 1, ...), so a
    ``limit`` takes a spread of stages and kinds rather than the first stage's ordinary questions.

    Of each kind's count, the ``annotate.own_words_share`` part are own-words items: each takes a
    different style passage of the stage as its reply (in one seeded order shared by the kinds, so no
    passage answers twice); the rest are annotator items seeded from all of the stage's material.

    Args:
        chunks_of: ``(persona, stage) -> chunks`` that may seed a dialogue (the stage's own material).
        stages: persona id -> the stage ids to plan.
    """
    cfg = settings.annotate
    counts = cfg.counts.model_dump()
    shares = cfg.own_words_shares(settings.annotator.model)
    seed = settings.seed
    rows: list[tuple[int, int, Item]] = []
    for persona in personas:
        for stage in stages[persona]:
            chunks = chunks_of(persona, stage)
            if not chunks:
                continue
            usable = [c for c in chunks if c.kind == "style" and c.words >= cfg.own_words_min_words]
            passages = seed_order(usable, seed, persona, stage, "own_words")
            for kind in KINDS:
                n_own = min(round(counts[kind] * shares.get(kind, 0.0)), len(passages))
                for index, passage in enumerate(passages[:n_own]):
                    rows.append(
                        (index, len(rows), own_item(persona, stage, kind, passage, index, "own_words"))
                    )
                passages = passages[n_own:]
                order = seed_order(chunks, seed, persona, stage, kind)
                for index in range(counts[kind] - n_own):
                    item = make_item(
                        persona,
                        stage,
                        kind,
                        order[index % len(order)],
                        index,
                        cfg.multi_turn_share,
                        cfg.max_follow_ups,
                    )
                    rows.append((index, len(rows), item))
    return [item for _, _, item in sorted(rows, key=lambda row: (row[0], row[1]))]


def own_item(persona: str, stage: str, kind: str, passage: Chunk, index: int, source: str) -> Item:
    """An item whose reply is ``passage`` itself; only its user turn (and analysis) is written."""
    ident = item_id(persona, stage, kind, passage.ref, index, source)
    return Item(ident, persona, stage, kind, passage, index, source=source)


def plan_heldout(
    settings: AnnotateSettings,
    heldout_of: Callable[[str, str], list[Chunk]],
    personas: list[str],
    stages: dict[str, list[str]],
) -> list[Item]:
    """One item per held-out passage: its back-written question is the held-out evaluation's input.

    The kind is drawn per passage: ``opinion`` in proportion to the opinion items among own-words items.
    """
    cfg = settings.annotate
    shares = cfg.own_words_shares(settings.annotator.model)
    weights = {k: cfg.counts.model_dump()[k] * shares.get(k, 0.0) for k in OWN_WORDS_KINDS}
    opinion = weights["opinion"] / sum(weights.values()) if sum(weights.values()) > 0 else 0.0
    items: list[Item] = []
    for persona in personas:
        for stage in stages[persona]:
            for index, passage in enumerate(heldout_of(persona, stage)):
                kind = "opinion" if unit(f"{passage.id}:heldout-kind") < opinion else "ordinary"
                items.append(own_item(persona, stage, kind, passage, index, "heldout"))
    return items
