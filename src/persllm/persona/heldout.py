"""The held-out split of a persona's own words: passages set aside before indexing, for evaluation only.

Per persona and stage a seeded share of the style passages is held out. The split is made on the chunks
before the index is built, so a held-out passage can never be retrieved, seed a dialogue, become a golden
reply or enter a preference pair: the index does not contain it. Its text is also removed from every
other chunk list of the project (a corpus that uses the same speeches as knowledge and style would
otherwise let it back in as knowledge), and so is every chunk that repeats a run of its words: a speech
printed twice with other dashes, or quoted later, would otherwise put the held-out words back in the
index. What is held out is written to ``index/<persona>/<stage>/heldout.jsonl`` and listed in the
manifest.
"""

import logging
import random
import re
from dataclasses import dataclass

from persllm.errors import UserError
from persllm.hashing import stable_hash
from persllm.persona.corpus import Chunk
from persllm.persona.dialogue import Exchange, without_heldout

log = logging.getLogger("persllm")

RUN_WORDS = 12  # a shared run of this many words (case and punctuation aside) makes two texts one passage


@dataclass(frozen=True)
class HoldoutRule:
    """How many passages a stage sets aside: ``share`` of them, at least ``minimum``, at most ``maximum``."""

    share: float
    minimum: int
    maximum: int | None
    min_train: int
    strict: bool = False
    min_words: int = 1

    def count(self, n: int) -> int:
        if self.share <= 0 or n == 0:
            return 0
        wanted = max(round(n * self.share), self.minimum)
        return min(wanted, self.maximum) if self.maximum is not None else wanted

    def smallest_stage(self) -> int:
        """The fewest style passages a stage needs so that ``min_train`` remain after the split."""
        return next(n for n in range(1, 100_000) if n - self.count(n) >= self.min_train)


def choose_heldout(chunks: list[Chunk], rule: HoldoutRule, seed: int, where: str) -> list[Chunk]:
    """The style chunks of one stage to hold out, by a seeded shuffle of their references.

    Only passages of at least ``min_words`` words are candidates: a heading or a signature line is no
    reference for an answer.
    The choice depends only on the chunks' references and texts and the seed, not on their order.
    A stage with too few style passages to split holds out nothing: a warning naming ``where`` and the
    minimum, or with ``strict`` a user error. A stage with none holds out nothing, silently here.
    """
    style = sorted(
        (c for c in chunks if c.kind == "style" and c.words >= rule.min_words), key=lambda c: (c.ref, c.id)
    )
    n_held = rule.count(len(style))
    if not style:
        return []  # whether the stage has any held-out evaluation is for ``nothing_held_out`` to say
    if len(style) - n_held < rule.min_train:
        problem = (
            f"{where}: {len(style)} style passages are too few for the held-out split (at least "
            f"{rule.smallest_stage()} with holdout.share {rule.share}, min_passages {rule.minimum}, "
            f"min_train {rule.min_train})"
        )
        if rule.strict:
            raise UserError(f"{problem}; add passages, lower those settings, or set holdout.share: 0")
        log.warning(
            "warning: %s, so nothing is held out there; add passages for a held-out evaluation", problem
        )
        return []
    rng = random.Random(int(stable_hash([seed, where, "holdout"], length=15), 16))
    rng.shuffle(style)
    held: list[Chunk] = []
    runs: set[str] = set()
    for candidate in style:  # a repeat of a passage already held out would be its own decoy
        if len(held) == n_held:
            break
        own = word_runs(candidate.text)
        if not own & runs:
            held.append(candidate)
            runs |= own
    return sorted(held, key=lambda c: (c.ref, c.id))


def word_runs(text: str) -> set[str]:
    """Every run of ``RUN_WORDS`` consecutive words of ``text``, lowercased, punctuation dropped (the
    whole text when it is shorter)."""
    words = re.findall(r"[^\W_]+", text.lower())
    if len(words) <= RUN_WORDS:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + RUN_WORDS]) for i in range(len(words) - RUN_WORDS + 1)}


def without_texts(chunks: list[Chunk], texts: set[str]) -> list[Chunk]:
    """``chunks`` less every chunk (of any kind, stage or persona) that is one of ``texts`` or repeats
    ``RUN_WORDS`` consecutive words of one."""
    runs = set().union(*(word_runs(text) for text in texts)) if texts else set()
    return [chunk for chunk in chunks if chunk.text not in texts and not word_runs(chunk.text) & runs]


def split_stages(
    stages: list[tuple[str, str, list[Chunk]]], rule: HoldoutRule, seed: int
) -> tuple[list[tuple[str, str, list[Chunk]]], dict[tuple[str, str], list[Chunk]]]:
    """The indexable chunks of every (persona, stage, chunks), and the held-out ones per (persona, stage).

    All stages are checked before anything is returned, so a user error leaves the run folder untouched.
    """
    heldout = {
        (persona, stage): choose_heldout(chunks, rule, seed, f"persona {persona!r}, stage {stage!r}")
        for persona, stage, chunks in stages
    }
    texts = {chunk.text for held in heldout.values() for chunk in held}
    kept = [(persona, stage, without_texts(chunks, texts)) for persona, stage, chunks in stages]
    return kept, heldout


def split_exchanges(
    exchanges: list[Exchange], rule: HoldoutRule, seed: int, where: str
) -> tuple[list[Exchange], list[Exchange]]:
    """(training, held-out) exchanges of one stage: a seeded share of whole exchanges is set aside.

    The same rule as passages (share, at least ``minimum``, at most ``maximum``, ``min_train`` left).
    A training exchange whose earlier turns hold a held-out reply is cut to start after it, so no
    held-out reply is ever in training text.
    """
    n_held = rule.count(len(exchanges))
    if n_held == 0 or len(exchanges) - n_held < rule.min_train:
        if exchanges and rule.share > 0:
            log.warning(
                "warning: %s: %d real exchanges are too few to hold some out (min_train %d); none of "
                "them is evaluated",
                where,
                len(exchanges),
                rule.min_train,
            )
        return exchanges, []
    order = sorted(exchanges, key=lambda e: e.ref)
    rng = random.Random(int(stable_hash([seed, where, "holdout-exchanges"], length=15), 16))
    rng.shuffle(order)
    chosen = {id(e) for e in order[:n_held]}
    heldout = [e for e in exchanges if id(e) in chosen]
    train = without_heldout([e for e in exchanges if id(e) not in chosen], heldout)
    return train, heldout


def nothing_held_out(where: str, rule: HoldoutRule) -> None:
    """A stage with no own words and no real exchanges to hold out: a warning, or with ``strict`` an error."""
    if rule.share <= 0:
        return
    problem = (
        f"{where}: no style passages (the person's own words) and no real exchanges, so nothing is held out "
        "and there is no held-out evaluation for this stage"
    )
    if rule.strict:
        raise UserError(f"{problem}; add style or dialogue files, or set holdout.strict: false")
    log.warning("warning: %s; add style or dialogue files to get one", problem)
