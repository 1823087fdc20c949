"""Pure prompt building of chat/serve/converse: labels, merging, trimming, streamed analysis splitting."""

import pytest

from persllm.interact.prompting import (
    ThinkSplitter,
    fit,
    label_first_user,
    merge_consecutive,
    trim_to_budget,
)
from persllm.prompting import render_inline, split_inline


def words(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def test_label_goes_on_the_first_user_turn_only_once() -> None:
    messages = [
        {"role": "system", "content": "You are Elsie."},
        {"role": "user", "content": "Who keeps the light?"},
        {"role": "assistant", "content": "I do."},
        {"role": "user", "content": "Since when?"},
    ]
    labelled = label_first_user(messages, "<TIME-II>")
    assert labelled[1]["content"] == "<TIME-II> Who keeps the light?"
    assert labelled[3]["content"] == "Since when?"
    assert messages[1]["content"] == "Who keeps the light?"  # the input is not changed
    assert label_first_user(labelled, "<TIME-II>")[1]["content"] == "<TIME-II> Who keeps the light?"
    assert label_first_user(messages, None) == messages


def test_merge_consecutive_joins_same_roles() -> None:
    merged = merge_consecutive(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    )
    assert [m["role"] for m in merged] == ["system", "user", "assistant"]
    assert merged[1]["content"] == "a\n\nb"


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "system prompt here"}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"question {i} " + "word " * 5},
            {"role": "assistant", "content": f"answer {i} " + "word " * 5},
        ]
    return [*messages, {"role": "user", "content": "last question"}]


def test_trim_drops_oldest_turns_keeps_system_and_last() -> None:
    messages = conversation(6)
    trimmed = trim_to_budget(messages, words, budget=30)
    assert words(trimmed) <= 30
    assert trimmed[0] == messages[0]
    assert trimmed[-1]["content"] == "last question"
    assert trimmed[1]["role"] == "user"
    assert trimmed[1:] == messages[len(messages) - len(trimmed) + 1 :]  # a suffix of the conversation
    assert trim_to_budget(messages, words, budget=10_000) == messages


def test_trim_keeps_pinned_messages_and_the_last_even_over_budget() -> None:
    messages = conversation(4)
    trimmed = trim_to_budget(messages, words, budget=20, pinned=1)
    assert trimmed[:2] == messages[:2]
    assert trimmed[-1]["content"] == "last question"
    assert trim_to_budget(messages, words, budget=1)[-1]["content"] == "last question"


def test_fit_counts_the_label_and_labels_the_new_first_turn() -> None:
    messages = conversation(5)
    fitted = fit(messages, words, budget=25, label="<TIME-I>")
    assert words(fitted) <= 25
    assert fitted[1]["content"].startswith("<TIME-I> ")
    assert sum(m["content"].count("<TIME-I>") for m in fitted) == 1


TEXT = render_inline("The user asks about the lamp.\nIt burns paraffin.", "The lamp burns paraffin, sir.")


def split_stream(pieces: list[str]) -> tuple[str, str]:
    splitter, analysis, response = ThinkSplitter(), "", ""
    for piece in pieces:
        a, r = splitter.feed(piece)
        analysis, response = analysis + a, response + r
    a, r = splitter.finish()
    return analysis + a, response + r


@pytest.mark.parametrize("cut", range(len(TEXT) + 1))
def test_splitter_handles_tags_cut_anywhere(cut: int) -> None:
    assert split_stream([TEXT[:cut], TEXT[cut:]]) == split_inline(TEXT)
    assert split_stream([TEXT[:cut] + "  \n", TEXT[cut:] + "\n "]) == split_inline(
        TEXT[:cut] + "  \n" + TEXT[cut:]
    )


def test_splitter_character_by_character_and_without_analysis() -> None:
    analysis, response = split_stream(list(TEXT))
    assert analysis == "The user asks about the lamp.\nIt burns paraffin."
    assert response == "The lamp burns paraffin, sir."
    assert split_stream(["<think>\n a  b \n", "\n c \n</think>\n\n", " d \n e\n", "\n"]) == (
        "a  b \n\n c",
        "d \n e",
    )
    assert split_stream(list("  plain answer <b>")) == ("", "plain answer <b>")
    assert split_stream(["<thi", "nk>\ncut off"]) == ("cut off", "")
    assert split_stream(["<th"]) == ("", "<th")
    assert split_stream([]) == ("", "")
