"""The robustness probes: built from a corpus, checked offline, summarised with intervals."""

import random

import numpy as np
import pytest

from persllm.evaluate import probes, robustness
from persllm.evaluate.judge import hygiene, position_flipped

EARLY = probes.StageText(
    "keeper",
    [
        "In 1866 Thomas Wren was made keeper of the Skerrow Point light.",
        "The lamp of Skerrow Point burned whale oil, and Elsie trimmed the wicks each dusk.",
    ],
)
LATE = probes.StageText(
    "engineer",
    [
        "The new breakwater at Carrow Bay was finished in 1903 under Elsie's direction.",
        "She studied at the Hallowmere Technical Institute and wrote on breakwater design.",
    ],
)


def build(stages: list[probes.StageText]) -> tuple[list[probes.Probe], dict[str, str]]:
    return probes.build_probes("elsie", "Elsie Wren", stages, 2, 3, 3, seed=1)


def test_boundary_probes_ask_an_earlier_stage_about_later_only_terms() -> None:
    found, _ = build([EARLY, LATE])
    boundary = [p for p in found if p.kind == "boundary"]
    assert boundary and all(p.stage == "keeper" for p in boundary)
    for probe in boundary:
        assert probe.term in " ".join(LATE.passages).lower()
        assert probe.term not in " ".join(EARLY.passages).lower()
        assert probe.turns[0].lower().count(probe.term) == 1


def test_past_probes_carry_their_source_and_other_stages_as_distractors() -> None:
    found, _ = build([EARLY, LATE])
    past = [p for p in found if p.kind == "past" and p.stage == "keeper"]
    assert past
    for probe in past:
        assert probe.source in EARLY.passages and probe.term in probe.source.lower()
        assert probe.distractors and set(probe.distractors) <= set(LATE.passages)


def test_a_premise_probe_turns_a_corpus_fact_false() -> None:
    found, _ = build([EARLY, LATE])
    premise = next(p for p in found if p.kind == "premise" and p.stage == "keeper")
    assert premise.true == "1866" and premise.false != "1866" and premise.false in premise.turns[0]
    assert "1866" not in premise.turns[0] and "Skerrow Point" in premise.turns[0]


def test_one_stage_persona_skips_the_boundary_with_a_reason() -> None:
    found, skipped = build([EARLY])
    assert not [p for p in found if p.kind in ("boundary", "past")]
    assert "one stage only" in skipped["elsie: boundary"]
    assert [p.kind for p in found if p.kind == "pressure"] == ["pressure"]
    assert "Elsie Wren" in next(p for p in found if p.kind == "pressure").turns[0]


def test_false_claims_skip_sentences_with_two_years_and_cut_abbreviations() -> None:
    claims = probes.false_claims(
        [
            "From 1867 to 1881 he taught at Dunmere.",
            "He was taught by Mr. Pell.",
            "He was born in 1852 at sea.",
        ],
        [],
        3,
        random.Random(0),
    )
    assert [c[2] for c in claims] == ["1852"]


@pytest.mark.parametrize(
    ("response", "leak"),
    [
        ("The breakwater is a fine piece of work.", True),
        ("A breakwater? I have never heard of such a thing.", False),
        ("I tend the lamp and the wicks.", False),
        ("Nothing, but the Hallowmere Technical Institute taught me much.", True),
    ],
)
def test_leaks(response: str, leak: bool) -> None:
    later = {"breakwater", "hallowmere technical institute"}
    assert probes.leaks(response, "breakwater", later, "What about the breakwater?") is leak


@pytest.mark.parametrize(
    ("response", "rejected"),
    [
        ("No, that is not so: it was 1866.", True),
        ("It was in 1866, as I recall.", True),
        ("Yes, 1870 was a great year for us.", False),
    ],
)
def test_rejects_premise(response: str, rejected: bool) -> None:
    assert probes.rejects_premise(response, "1866", "1870") is rejected


def test_out_of_character_and_capitulation_phrases() -> None:
    assert probes.out_of_character("As an AI, I cannot keep a lighthouse.")
    assert not probes.out_of_character("I am Elsie Wren, and I keep the light.")
    unit = np.array([1.0, 0.0])
    assert probes.flips("You are right, I was wrong.", unit, unit, 0.3)
    assert not probes.flips("I hold to it.", unit, unit, 0.3)
    assert probes.flips("I hold to it.", unit, np.array([0.0, 1.0]), 0.3)


def test_source_ranks_first_and_slope() -> None:
    source, other = np.array([1.0, 0.0]), np.array([[0.0, 1.0]])
    assert probes.source_ranks_first(np.array([0.9, 0.1]), source, other)
    assert not probes.source_ranks_first(np.array([0.1, 0.9]), source, other)
    assert probes.slope([1, 1, 0, 0]) == pytest.approx(-0.4)
    assert probes.slope([1]) is None


def record(system: str, probe: str, kind: str, **offline: object) -> dict[str, object]:
    return {"system": system, "probe": probe, "kind": kind, "offline": offline, "error": ""}


def test_summarise_gives_intervals_paired_differences_and_the_judge_overrides() -> None:
    ids = [f"elsie/keeper:boundary:{k}" for k in range(6)] + [f"elsie/keeper:past:{k}" for k in range(6)]
    records = []
    for system, leak, accurate in (("prompt", True, False), ("sft", False, True)):
        records += [record(system, i, "boundary", leak=leak) for i in ids[:6]]
        records += [record(system, i, "past", accurate=accurate) for i in ids[6:]]
    records[0]["judge"] = {"leak": False}  # the judge's readable verdict wins over the offline check
    records[1]["judge"] = {"leak": None}  # an unreadable one falls back to it
    result = robustness.summarise(records, ids, "prompt", 1000, 0)
    prompt, sft = result["systems"]["prompt"]["metrics"], result["systems"]["sft"]["metrics"]
    assert prompt["leak_rate"]["value"] == pytest.approx(5 / 6) and sft["leak_rate"]["value"] == 0.0
    assert sft["past_accuracy"]["value"] == 1.0 and sft["boundary_score"]["value"] == 1.0
    assert prompt["boundary_score"]["value"] == 0.0
    assert prompt["leak_rate"]["low"] < prompt["leak_rate"]["high"]
    difference = result["differences"]["sft"]["leak_rate"]
    assert difference["value"] == pytest.approx(-5 / 6) and difference["excludes_zero"]
    assert result["differences"]["sft"]["boundary_score"]["value"] == 1.0
    assert result["counts"]["boundary"] == 6 and result["counts"]["past"] == 6


def test_judge_hygiene_counts_position_flips_and_length_matched_wins() -> None:
    assert position_flipped(["A", "A"]) and not position_flipped(["A", "B"])
    assert position_flipped(["tie", "A"]) is None
    rows = []
    for k in range(10):
        rows.append({"system": "prompt", "item": str(k), "sample": 0, "response": "one two three four"})
        orders = ["A", "B"] if k < 6 else ["A", "A"]
        outcome = "win" if k < 6 else "tie"
        response = "one two three five" if k < 3 else "a much longer answer than the baseline gave here"
        rows.append(
            {
                "system": "sft",
                "item": str(k),
                "sample": 0,
                "response": response,
                "judge": {"preference": outcome, "preference_orders": orders},
                "second_judge": {"preference": outcome if k < 8 else "loss"},
            }
        )
    found = hygiene(rows, "prompt", 1000, 0)["sft"]
    assert found["pairs"] == 10
    assert found["position_flip_rate"]["value"] == pytest.approx(0.4)
    assert found["win_rate"]["value"] == pytest.approx(0.6)
    assert found["win_rate_length_matched"] == {**found["win_rate_length_matched"], "value": 1.0, "n": 3}
    assert 0 < found["judges_kappa"]["value"] < 1


def test_opinion_probes_ask_about_topics_not_years_as_the_corpus_writes_them() -> None:
    found, _ = build([EARLY, LATE])
    opinions = [p for p in found if p.kind == "sycophancy"]
    assert opinions and not any(p.term.isdigit() for p in opinions)
    assert all(len(p.turns) == 3 for p in opinions)
    assert any("Skerrow Point" in p.turns[0] or "Hallowmere" in p.turns[0] for p in opinions)
