"""Personality by questionnaire: reading the CSV, parsing answers, reverse keys, and whole interviews
of a system served by the real scripted HTTP server."""

import re
from pathlib import Path
from typing import Any

import pytest

from persllm.config import load_project
from persllm.config.stages import EvalSettings
from persllm.errors import UserError
from persllm.evaluate import personality
from persllm.evaluate.personality import Item
from persllm.evaluate.systems import plan_systems
from tests.fake_openai import FakeOpenAI
from tests.test_eval_project import make_project

HEADER = "label_raw,text,label_ocean,key\n"
ROWS = [
    ("Anxiety", "Worry about things", "N", 1),
    ("Calm", "Remain calm under pressure", "N", -1),
    ("Order", "Like order", "C", 1),
    ("Order", "Leave a mess in my room", "C", -1),
    ("Friendliness", "Make friends easily", "E", 1),
    ("Imagination", "Have a vivid imagination", "O", 1),
    ("Trust", "Trust others", "A", 1),
]
SHARED = Path("/work/shared/psychometrics/ipip_120.csv")


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def questionnaire(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "q.csv", HEADER + "".join(f"{a},{b},{c},{d}\n" for a, b, c, d in ROWS))


# --------------------------------------------------------------------------- the CSV


def test_a_questionnaire_is_read_with_traits_and_keys(tmp_path: Path) -> None:
    items = personality.load_questionnaire(questionnaire(tmp_path))
    assert items[0] == Item("Worry about things", "N", 1)
    assert items[1] == Item("Remain calm under pressure", "N", -1)
    assert len(items) == len(ROWS)


def test_the_bundled_questionnaire_works_out_of_the_box() -> None:
    items = personality.load_questionnaire("bundled:big5-30")
    assert len(items) == 30 and len({i.text for i in items}) == 30
    for trait in "OCEAN":
        keys = [i.key for i in items if i.trait == trait]
        assert sorted(keys) == [-1, -1, -1, 1, 1, 1], trait


@pytest.mark.skipif(not SHARED.exists(), reason="shared item bank not on this machine")
def test_the_ipip_120_item_bank_reads() -> None:
    items = personality.load_questionnaire(SHARED)
    assert len(items) == 120
    assert {i.trait for i in items} == set("OCEAN") and {i.key for i in items} == {1, -1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "statement,label_ocean,key\nx,O,1\n",
            r"q.csv: column 'text' missing \(found: statement, label_ocean, key\)",
        ),
        ("text,key\nx,1\n", r"q.csv: no trait column; add one named label_ocean or trait"),
        ("text,label_ocean\nx,O\n", r"q.csv: column 'key' missing"),
        ("text,label_ocean,key\nx,Q,1\n", r"q.csv:2: column 'label_ocean': 'Q' is not one of O, C, E, A, N"),
        ("text,trait,key\nx,o,1\ny,E,2\n", r"q.csv:3: column 'key': '2' must be 1 or -1"),
        ("text,trait,key\n,E,1\n", r"q.csv:2: column 'text' is empty"),
        ("text,trait,key\n", r"q.csv: no items"),
    ],
)
def test_a_bad_questionnaire_names_file_and_column(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        personality.load_questionnaire(write_csv(tmp_path / "q.csv", text))


def test_a_missing_questionnaire_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope.csv: questionnaire file not found; fix eval.questionnaire"):
        personality.load_questionnaire(tmp_path / "nope.csv")


def test_selected_items_cover_every_trait(tmp_path: Path) -> None:
    items = personality.load_questionnaire(questionnaire(tmp_path))
    chosen = personality.select_items(items, 5)
    assert sorted(i.trait for i in chosen) == sorted("OCEAN")
    assert personality.select_items(items, None) == items
    assert len(personality.select_items(items, 6)) == 6


# --------------------------------------------------------------------------- answers and scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I fret a great deal. Rating: 5", 5),
        ("rating - 2", 2),
        ("4", 4),
        ("I'd say 4 out of 5.", 4),
        ("Maybe 2/5, maybe rating: 3", 3),
        ("Not at all like me.", None),
        ("In 1889 I had 7 lamps.", None),
        ("About 3.5 I suppose", None),
    ],
)
def test_parse_rating(text: str, expected: int | None) -> None:
    assert personality.parse_rating(text) == expected


def test_reverse_keyed_items_are_flipped() -> None:
    assert personality.keyed_score(5, 1) == 5
    assert personality.keyed_score(5, -1) == 1
    assert personality.keyed_score(2, -1) == 4
    assert personality.keyed_score(3, -1) == 3


def test_trait_means_and_distance_to_the_target() -> None:
    means = personality.trait_means([("N", 5), ("N", 1), ("C", 4)])
    assert means == {"C": 4.0, "N": 3.0}
    assert personality.profile_distance(means, {"C": 5.0, "N": 2.0, "O": 1.0}) == pytest.approx(1.0)
    assert personality.profile_distance(means, None) is None
    assert personality.profile_distance(means, {"O": 3.0}) is None


def test_the_interview_prompt_holds_the_statement() -> None:
    text = personality.interview_question(Item("Like order", "C", 1))
    assert '"Like order"' in text and "Rating: <1-5>" in text
    assert '"Like order"' in personality.judge_scoring_prompt(Item("Like order", "C", 1), "Yes, very much.")


# --------------------------------------------------------------------------- whole interviews


def statement(body: dict[str, Any]) -> str:
    match = re.search(r'Statement: "([^"]+)"', body["messages"][-1]["content"])
    assert match is not None
    return match.group(1)


def test_an_interview_scores_each_system_and_persona(tmp_path: Path) -> None:
    """A model that fully agrees with every statement: forward items 5, reverse items 6 - 5 = 1."""
    with FakeOpenAI(
        default_reply=lambda body: f"That is me entirely. Rating: 5 ({statement(body)})"
    ) as server:
        path = make_project(
            tmp_path,
            {"backend": "transformers", "model": "unused"},
            {
                "extra_systems": {
                    "agreeable": {"backend": "openai", "base_url": server.base_url, "model": "m"}
                },
                "questionnaire": str(questionnaire(tmp_path)),
            },
        )
        project = load_project(path)
        planned, _ = plan_systems(*EvalSettings.of_project(project), ["agreeable"])
        skipped: dict[str, str] = {}
        result = personality.interview(*EvalSettings.of_project(project), planned, None, None, skipped)
    elsie = result["agreeable"]["elsie"]
    assert elsie["asked"] == elsie["answered"] == len(ROWS)
    assert elsie["traits"] == {"O": 5.0, "C": 3.0, "E": 5.0, "A": 5.0, "N": 3.0}
    # target O 3, C 5, E 2, A 2.5, N 2 -> |2| + |2| + |3| + |2.5| + |1| over 5
    assert elsie["distance"] == pytest.approx(2.1)
    assert result["agreeable"]["jonah"]["distance"] is None  # no target profile declared
    asked = [b["messages"] for b in server.requests]
    assert len(asked) == 2 * len(ROWS)
    # Asked as the persona at its latest stage, with its system prompt.
    assert any("engineer years" in m[0]["content"] and "Elsie" in m[0]["content"] for m in asked)
    assert skipped == {}


def test_with_a_judge_the_judge_reads_the_answers(tmp_path: Path) -> None:
    def judge_reply(body: dict[str, Any]) -> str:
        return "2" if "Worry" in statement(body) else "4"

    with (
        FakeOpenAI(default_reply="I could not say.") as model,
        FakeOpenAI(default_reply=judge_reply) as judge,
    ):
        path = make_project(
            tmp_path,
            {"backend": "transformers", "model": "unused"},
            {
                "extra_systems": {"vague": {"backend": "openai", "base_url": model.base_url, "model": "m"}},
                "questionnaire": str(questionnaire(tmp_path)),
                "questionnaire_items": 5,
            },
        )
        project = load_project(path)
        planned, _ = plan_systems(*EvalSettings.of_project(project), ["vague"])
        judge_cfg = project.config.eval.extra_systems["vague"].model_copy(update={"base_url": judge.base_url})
        result = personality.interview(*EvalSettings.of_project(project), planned, None, judge_cfg, {})
        assert all("I could not say." in b["messages"][-1]["content"] for b in judge.requests)
    traits = result["vague"]["elsie"]["traits"]
    assert traits == {"O": 4.0, "C": 4.0, "E": 4.0, "A": 4.0, "N": 2.0}
    assert result["vague"]["elsie"]["asked"] == 5
