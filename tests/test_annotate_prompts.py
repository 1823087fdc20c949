"""Prompt builders: what each annotator prompt must contain (and what it must not leave unfilled)."""

import re

import pytest

from persllm.annotate import prompts
from persllm.config import PersonaConfig

PERSONA = PersonaConfig.model_validate(
    {
        "id": "ada",
        "name": "Ada Thorne",
        "profile": "A ferry captain on Lake Marrow who trusts her tide tables.",
        "language": "en",
        "stages": [
            {"id": "mate", "time": "It is 1890, aboard the steam ferry Heron.", "knowledge": ["k/*.md"]},
            {"id": "captain", "time": "It is 1902, at Marrow Quay.", "knowledge": ["c/*.md"]},
        ],
    }
)
STAGE = PERSONA.stages[0]
SEED = "The Heron made four crossings a day in summer and two in winter {not a placeholder}."
TURNS = [
    {"role": "user", "content": "Did the Heron cross six times a day in winter?"},
    {"role": "assistant", "analysis": "SECRET-NOTES", "content": "Two, never more."},
    {"role": "user", "content": "Surely six?"},
]


def unfilled(messages: list[dict[str, str]]) -> list[str]:
    names = "name|profile|time|seed|task|dialogue|knowledge|style|analysis|format|language|stance"
    return [m for msg in messages for m in re.findall(rf"\{{(?:{names})\}}", msg["content"])]


@pytest.mark.parametrize("kind", prompts.KINDS)
def test_user_input_prompt_carries_persona_time_and_seed(kind: str) -> None:
    messages = prompts.build_user_input_messages(PERSONA, STAGE, kind, SEED, "conflict")
    text = "\n".join(m["content"] for m in messages)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "It is 1890, aboard the steam ferry Heron." in text
    assert "Ada Thorne" in text and "trusts her tide tables" in text
    assert SEED in text  # inserted verbatim: its braces are not treated as a placeholder
    assert "English" in text
    assert unfilled(messages) == []


def test_each_kind_asks_for_its_own_thing() -> None:
    ordinary, misleading, opinion = (
        prompts.build_user_input_messages(PERSONA, STAGE, kind, SEED, "conflict")[1]["content"]
        for kind in prompts.KINDS
    )
    assert "question" in ordinary and "false premise" not in ordinary
    assert "false premise" in misleading and "opinion" in misleading
    assert "three to five sentences" in opinion and "strongly conflict" in opinion
    agree = prompts.build_user_input_messages(PERSONA, STAGE, "opinion", SEED, "agree")[1]["content"]
    assert "agree with Ada Thorne" in agree
    with pytest.raises(ValueError):
        prompts.build_user_input_messages(PERSONA, STAGE, "rant", SEED)


def test_reply_prompt_has_profile_time_contexts_dialogue_and_rules() -> None:
    messages = prompts.build_reply_messages(
        PERSONA, STAGE, TURNS, "[k.md:1] KNOWLEDGE-TEXT", "[s.txt:1] STYLE", "json"
    )
    text = "\n".join(m["content"] for m in messages)
    for expected in (
        "It is 1890",
        "tide tables",
        "KNOWLEDGE-TEXT",
        "STYLE",
        "Surely six?",
        "Two, never more.",
    ):
        assert expected in text
    assert "SECRET-NOTES" not in text  # earlier analyses are private
    assert (
        "false premise" in text and "flatter" in text and "nothing from later" in text.replace("using ", "")
    )
    assert '"analysis" and "response"' in text
    delimited = prompts.build_reply_messages(PERSONA, STAGE, TURNS, "k", "s", "delimited")[1]["content"]
    assert "ANALYSIS:" in delimited and "RESPONSE:" in delimited
    assert unfilled(messages) == [] and unfilled([{"content": delimited}]) == []
    empty = prompts.build_reply_messages(PERSONA, STAGE, TURNS, "", "  ", "json")[1]["content"]
    assert "(nothing found)" in empty
    with pytest.raises(ValueError):
        prompts.build_reply_messages(PERSONA, STAGE, TURNS, "k", "s", "two_step")


def test_two_step_prompts() -> None:
    analysis = prompts.build_analysis_messages(PERSONA, STAGE, TURNS, "KNOWLEDGE-TEXT")
    assert "KNOWLEDGE-TEXT" in analysis[1]["content"] and "Surely six?" in analysis[1]["content"]
    assert "notes" in analysis[1]["content"]
    response = prompts.build_response_messages(
        PERSONA, STAGE, TURNS, "K", "S", "The user repeats a wrong number."
    )
    assert response[0]["role"] == "system"
    assert "You are Ada Thorne" in response[0]["content"] and "It is 1890" in response[0]["content"]
    assert "The user repeats a wrong number." in response[0]["content"]
    # The real dialogue follows as chat turns, ending with the user's message, without analyses.
    assert response[1:] == [{"role": t["role"], "content": t["content"]} for t in TURNS]
    assert unfilled(analysis) == [] and unfilled(response) == []


@pytest.mark.parametrize("kind", prompts.KINDS)
def test_follow_up_prompt(kind: str) -> None:
    messages = prompts.build_follow_up_messages(PERSONA, STAGE, kind, TURNS[:2])
    text = messages[1]["content"]
    assert "It is 1890" in text and "User: Did the Heron" in text and "Ada Thorne: Two, never more." in text
    assert "next words" in text
    assert unfilled(messages) == []
    if kind == "misleading":
        assert "astray" in text


def test_render_needs_every_placeholder() -> None:
    with pytest.raises(KeyError, match="name"):
        prompts.render("kind_ordinary")
    assert prompts.render("kind_ordinary", name="X").startswith("Write what a curious visitor asks X")


def test_language_names() -> None:
    assert prompts.language_name("de") == "German"
    assert prompts.language_name("Elvish") == "Elvish"
