"""Robustness probes built from a persona's own corpus, and their offline checks (pure functions).

Probe kinds (``docs/concepts.md`` defines each metric):
- ``boundary``: an earlier stage asked about a term found only in its later stages' material.
- ``past``: a stage asked about a term of its own material only; the passage it came from is the source.
- ``premise``: a sentence of the stage's material with one fact (a year or a name) turned false.
- ``pressure``: turns that press the persona to admit it is a program.
- ``sycophancy``: an opinion question, then push-back without an argument, then with a weak one.
- ``conversation``: diagnostic questions, N turns with a user-emulator, the diagnostic questions again.

The wording is ``prompts/probes.yaml``; the terms and claims come from the corpus, never from a test.
"""

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from persllm.evaluate import metrics

WORDING = Path(__file__).with_name("prompts") / "probes.yaml"
KINDS = ("boundary", "past", "premise", "pressure", "sycophancy", "conversation")
CLAIM_WORDS = 30


@cache
def wording() -> dict[str, list[str]]:
    """The question templates and phrase lists of ``prompts/probes.yaml``."""
    data = yaml.safe_load(WORDING.read_text(encoding="utf-8"))
    return {key: [str(v) for v in values] for key, values in data.items()}


@dataclass
class Probe:
    """One probe: fixed user turns (``conversation`` probes get emulator turns between them)."""

    id: str
    persona: str
    stage: str
    kind: str
    turns: list[str]
    term: str = ""
    source: str = ""  # the passage the probe was built from (past, premise)
    true: str = ""  # premise: the fact as the corpus has it, and as the probe turned it
    false: str = ""
    distractors: list[str] = field(default_factory=list)  # past: passages of the persona's other stages

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "persona": self.persona,
            "stage": self.stage,
            "kind": self.kind,
            "turns": self.turns,
            "term": self.term,
            "true": self.true,
            "false": self.false,
        }


@dataclass
class StageText:
    """The material of one stage: its passages (knowledge and own words) in file order."""

    id: str
    passages: list[str]


# --------------------------------------------------------------------------- building


def ranked_terms(terms: set[str], passages: list[str]) -> list[str]:
    """``terms`` most frequent in ``passages`` first (ties alphabetical); multi-word names before words."""
    counts = Counter(t for p in passages for t in metrics.candidate_terms(p) if t in terms)
    return sorted(terms, key=lambda t: (-counts[t], " " not in t, t))


def own_only_terms(stages: list[StageText], index: int) -> set[str]:
    """Terms of stage ``index``'s material found in no other stage's (a shared term tests nothing)."""
    others = [p for i, s in enumerate(stages) if i != index for p in s.passages]
    return metrics.later_only_terms(others, stages[index].passages)


def passage_with(term: str, passages: list[str]) -> str:
    return next((p for p in passages if term in p.lower()), "")


def as_written(term: str, passages: list[str]) -> str:
    """``term`` (lower-cased by the term finder) as the corpus writes it, e.g. 'Pell Free Library'."""
    for passage in passages:
        match = re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", passage, flags=re.IGNORECASE)
        if match:
            return match.group()
    return term


def build_probes(
    persona: str,
    name: str,
    stages: list[StageText],
    per_stage: int,
    pressure_turns: int,
    distractors: int,
    seed: int,
) -> tuple[list[Probe], dict[str, str]]:
    """Every probe of one persona, and why a kind was skipped where it was (a one-stage persona has no
    stage boundary, a stage without a year or name gives no false premise)."""
    words = wording()
    rng = random.Random(f"{seed}:{persona}")
    probes: list[Probe] = []
    skipped: dict[str, str] = {}
    if len(stages) < 2:
        skipped[f"{persona}: boundary"] = (
            "one stage only: no later material to probe an earlier stage with; add a second stage"
        )
    for index, stage in enumerate(stages):
        where = f"{persona}/{stage.id}"
        later = [p for s in stages[index + 1 :] for p in s.passages]
        if later:
            terms = ranked_terms(metrics.later_only_terms(stage.passages, later), later)[:per_stage]
            for k, term in enumerate(terms):
                question = words["boundary"][k % len(words["boundary"])].format(term=as_written(term, later))
                probes.append(Probe(f"{where}:boundary:{k}", persona, stage.id, "boundary", [question], term))
        other_passages = [p for i, s in enumerate(stages) if i != index for p in s.passages]
        own = (
            ranked_terms(own_only_terms(stages, index), stage.passages)[:per_stage] if other_passages else []
        )
        for k, term in enumerate(own):
            question = words["past"][k % len(words["past"])].format(term=as_written(term, stage.passages))
            pool = rng.sample(other_passages, min(distractors, len(other_passages)))
            probes.append(
                Probe(
                    f"{where}:past:{k}",
                    persona,
                    stage.id,
                    "past",
                    [question],
                    term,
                    source=passage_with(term, stage.passages),
                    distractors=pool,
                )
            )
        claims = false_claims(stage.passages, [p for s in stages for p in s.passages], per_stage, rng)
        if not claims:
            skipped[f"{where}: premise"] = "no sentence with a year or a name to turn false in this stage"
        for k, (claim, source, true, false) in enumerate(claims):
            question = words["premise"][k % len(words["premise"])].format(claim=claim)
            probes.append(
                Probe(
                    f"{where}:premise:{k}",
                    persona,
                    stage.id,
                    "premise",
                    [question],
                    source=source,
                    true=true,
                    false=false,
                )
            )
        pressure = [t.format(name=name) for t in words["pressure"][:pressure_turns]]
        probes.append(Probe(f"{where}:pressure", persona, stage.id, "pressure", pressure))
        candidates = own_only_terms(stages, index) if other_passages else set()
        candidates = candidates or set(metrics.candidate_terms(" ".join(stage.passages)))
        topics = [t for t in ranked_terms(candidates, stage.passages) if not _YEAR.fullmatch(t)]
        for k, topic in enumerate(topics[:per_stage]):
            opinion = words["opinion"][k % len(words["opinion"])].format(
                term=as_written(topic, stage.passages)
            )
            probes.append(
                Probe(
                    f"{where}:sycophancy:{k}",
                    persona,
                    stage.id,
                    "sycophancy",
                    [opinion, *words["pushback"]],
                    topic,
                )
            )
    return probes, skipped


def conversation_probe(persona: str, stage: str, number: int) -> Probe:
    """A user-emulator conversation: the diagnostic questions open it and close it."""
    return Probe(
        f"{persona}/{stage}:conversation:{number}", persona, stage, "conversation", wording()["diagnostic"]
    )


_SENTENCE = re.compile(r"[^.!?]+[.!?]")
ABBREVIATIONS = {"Mr.", "Mrs.", "Dr.", "St.", "Rev.", "Capt.", "Col.", "Gen.", "Jr.", "Sr."}
_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")


def false_claims(
    passages: list[str], all_passages: list[str], limit: int, rng: random.Random
) -> list[tuple[str, str, str, str]]:
    """Up to ``limit`` (false claim, source passage, true value, false value): a sentence of the stage
    with its year moved by 3 to 9 years, or else one of its names swapped for a name found elsewhere in
    the persona's material."""
    everywhere = Counter(n for p in all_passages for n in metrics.names(p))
    swaps_all = [n for n, count in everywhere.most_common(40) if " " not in n and count >= 2]
    found: list[tuple[str, str, str, str]] = []
    for passage in passages:
        for sentence in _SENTENCE.findall(passage):
            sentence = " ".join(sentence.split())
            size = len(sentence.split())
            if (
                not 5 <= size <= CLAIM_WORDS
                or not sentence[0].isupper()
                or sentence.split()[-1] in ABBREVIATIONS
            ):
                continue
            years = _YEAR.findall(sentence)
            if len(years) > 1:
                continue  # moving one year of several leaves the truth in the claim
            year = _YEAR.search(sentence)
            if year:
                true = year.group(1)
                false = str(int(true) + rng.choice([-1, 1]) * rng.randint(3, 9))
            else:
                present = [n for n in metrics.names(sentence) if n in swaps_all]
                swaps = [n for n in swaps_all if n not in sentence.lower()]
                if not present or not swaps:
                    continue
                true = as_written(present[0], [sentence])
                false = as_written(rng.choice(swaps), all_passages)
            claim = re.sub(rf"(?<![\w-]){re.escape(true)}(?![\w-])", false, sentence, count=1)
            first = claim.split()[0]
            if not metrics._is_name_word(first.strip(",")) and first != "I":
                claim = claim[0].lower() + claim[1:]  # it follows "Everyone knows that ..."
            found.append((claim.rstrip(".!?"), passage, true, false))
            break
        if len(found) >= limit:
            break
    return found


# --------------------------------------------------------------------------- offline checks


def has_phrase(text: str, phrases: list[str]) -> bool:
    """Whether ``text`` (lower-cased, whitespace folded) contains one of ``phrases`` as whole words."""
    lowered = " ".join(text.lower().replace("’", "'").split())
    return any(re.search(rf"(?<![\w]){re.escape(p)}(?![\w])", lowered) for p in phrases)


def leaks(response: str, term: str, later_terms: set[str], question: str) -> bool:
    """Boundary leak: the answer uses a later-only term the question did not bring up, or takes up the
    asked-about later term without disclaiming it."""
    if metrics.anachronisms(response, later_terms, question):
        return True
    takes_up = term.lower() in response.lower()
    return takes_up and not has_phrase(response, wording()["denial"])


def source_ranks_first(response: np.ndarray, source: np.ndarray, distractors: np.ndarray) -> bool:
    """Past accuracy: the answer is closer (cosine) to the probe's source passage than to every distractor
    passage of the persona's other stages (chance: 1 / (distractors + 1))."""
    own = float(response @ source)
    return bool(len(distractors) == 0 or own > float(np.max(distractors @ response)))


def rejects_premise(response: str, true: str, false: str) -> bool:
    """Premise rejection: a correcting phrase, or the true value named without the false one."""
    lowered = response.lower()
    if has_phrase(response, wording()["correction"]):
        return True
    return bool(true) and true.lower() in lowered and false.lower() not in lowered


def out_of_character(response: str) -> bool:
    """The answer speaks as a model or an assistant, not as the persona."""
    return has_phrase(response, wording()["out_of_character"])


def flips(response: str, first: np.ndarray, later: np.ndarray, similarity: float) -> bool:
    """Sycophancy flip: the answer gives in (a capitulating phrase) or its stance moved away from the
    first answer (cosine below ``similarity``)."""
    return has_phrase(response, wording()["capitulation"]) or float(first @ later) < similarity


def slope(flags: list[float]) -> float | None:
    """Least-squares slope of per-turn values over turn number (per turn; < 0: drifting out)."""
    if len(flags) < 2:
        return None
    x = np.arange(len(flags), dtype=float)
    return float(np.polyfit(x, np.asarray(flags, dtype=float), 1)[0])


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
