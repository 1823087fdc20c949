"""Parsing annotator output: the messy shapes small models produce, and what must be rejected."""

import pytest

from persllm.annotate.parse import (
    Malformed,
    clean_analysis,
    clean_response,
    clean_user_input,
    cut_repetition,
    debris,
    load_object,
    parse_delimited_reply,
    parse_json_reply,
    strip_preamble,
    trim_truncated,
)

NAME = "Elsie Wren"


@pytest.mark.parametrize(
    "text",
    [
        "ANALYSIS: The user has the year wrong.\nRESPONSE: No, it was 1884.",
        "analysis: The user has the year wrong.\nresponse: No, it was 1884.",
        "**Analysis:** The user has the year wrong.\n\n**Response:** No, it was 1884.",
        "**ANALYSIS**: The user has the year wrong.\n**RESPONSE**: No, it was 1884.",
        "### Analysis\nThe user has the year wrong.\n\n### Response\nNo, it was 1884.",
        "1. Analysis - The user has the year wrong.\n2. Response - No, it was 1884.",
        "  ANALYSIS:   The user has the year wrong.   \n\n\n  RESPONSE:    No, it was 1884.   \n",
        "ANALYSIS: The user has the year wrong. RESPONSE: No, it was 1884.",
        "ANALYSIS: The user has the year wrong.\nRESPONSE: Elsie Wren: No, it was 1884.",
        'ANALYSIS: The user has the year wrong.\nRESPONSE: "No, it was 1884."',
        "```\nANALYSIS: The user has the year wrong.\nRESPONSE: No, it was 1884.\n```",
        "ANALYSIS: The user has the year wrong.\nRESPONSE: No, it was 1884.<|im_end|>",
        "The user has the year wrong.\nResponse: No, it was 1884.",
    ],
)
def test_delimited_reply_tolerates_formatting(text: str) -> None:
    assert parse_delimited_reply(text, NAME) == ("The user has the year wrong.", "No, it was 1884.")


def test_delimited_keeps_multiline_parts_and_cuts_invented_turns() -> None:
    text = (
        "ANALYSIS: First point.\nSecond point.\nRESPONSE: I kept the light.\nEvery night.\n\n"
        "User: And after that?\nElsie: More nights."
    )
    analysis, response = parse_delimited_reply(text, NAME)
    assert analysis == "First point.\nSecond point."
    assert response == "I kept the light.\nEvery night."


def test_delimited_prefers_the_response_label_over_an_answer_bullet_in_the_analysis() -> None:
    text = "ANALYSIS: Two questions.\n- Answer: the tower is white.\nRESPONSE: It is white, and tall."
    assert parse_delimited_reply(text, NAME) == (
        "Two questions.\n- Answer: the tower is white.",
        "It is white, and tall.",
    )


def test_delimited_stops_at_a_repeated_block() -> None:
    text = "ANALYSIS: a.\nRESPONSE: b.\nANALYSIS: again.\nRESPONSE: again."
    assert parse_delimited_reply(text, NAME) == ("a.", "b.")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Just an answer with no labels at all.", "missing_label"),
        ("ANALYSIS: notes only", "missing_label"),
        ("ANALYSIS: notes\nRESPONSE:", "empty"),
        ("ANALYSIS:\nRESPONSE: a reply.", "empty"),
        ("ANALYSIS: notes\nRESPONSE: <|im_start|>assistant Hello.", "debris"),
        ("ANALYSIS: notes\nRESPONSE: (Elsie Wren's reply to the user)", "debris"),
        ("ANALYSIS: notes\nRESPONSE: Dear {name}, no.", "debris"),
        ("ANALYSIS: notes\nRESPONSE: # The conversation so far\nUser said hi.", "debris"),
        ("ANALYSIS: notes\nRESPONSE: As an AI language model, I cannot keep a light.", "out_of_character"),
    ],
)
def test_delimited_rejects_malformed(text: str, reason: str) -> None:
    with pytest.raises(Malformed) as info:
        parse_delimited_reply(text, NAME)
    assert info.value.reason == reason


def test_truncated_response_is_cut_to_its_last_sentence() -> None:
    text = "ANALYSIS: notes.\nRESPONSE: The lamp was lit at dusk. Then the fog came in over the"
    assert parse_delimited_reply(text, NAME, truncated=True) == ("notes.", "The lamp was lit at dusk.")
    with pytest.raises(Malformed) as info:
        parse_delimited_reply("ANALYSIS: notes.\nRESPONSE: The lamp was lit at", NAME, truncated=True)
    assert info.value.reason == "truncated"


@pytest.mark.parametrize(
    "text",
    [
        '{"analysis": "Wrong year.", "response": "It was 1884."}',
        '```json\n{"analysis": "Wrong year.", "response": "It was 1884."}\n```',
        'Sure, here it is: {"Analysis": "Wrong year.", "Response": "It was 1884."} Hope that helps!',
        '{"analysis": "Wrong year.", "reply": "It was 1884."}',
        '{\n  "analysis": "  Wrong year. ",\n  "response": "Elsie Wren: It was 1884."\n}',
    ],
)
def test_json_reply_tolerates_wrapping(text: str) -> None:
    assert parse_json_reply(text, NAME) == ("Wrong year.", "It was 1884.")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "unparseable"),
        ('{"analysis": "a", "response": "cut off', "unparseable"),
        ('{"analysis": "a"}', "unparseable"),
        ('{"analysis": "a", "response": 3}', "unparseable"),
        ('["analysis", "response"]', "unparseable"),
        ('{"analysis": "a", "response": "   "}', "empty"),
        ('{"analysis": "a", "response": "ANALYSIS: b"}', "debris"),
    ],
)
def test_json_reply_rejects_malformed(text: str, reason: str) -> None:
    with pytest.raises(Malformed) as info:
        parse_json_reply(text, NAME)
    assert info.value.reason == reason


def test_load_object_skips_braces_that_are_not_objects() -> None:
    assert load_object('set {1, 2} then {"a": 1}') == {"a": 1}
    assert load_object("{broken") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("How tall is the tower?", "How tall is the tower?"),
        ('"How tall is the tower?"', "How tall is the tower?"),
        ("“How tall is the tower?”", "How tall is the tower?"),
        ("User: How tall is the tower?", "How tall is the tower?"),
        ("**Question:** How tall is the tower?", "How tall is the tower?"),
        ("How tall is the tower?\nElsie: Seventy-one feet.", "How tall is the tower?"),
        ("How tall is the tower?\n\nElsie Wren: Seventy-one feet.", "How tall is the tower?"),
        ('The visitor\'s question is: "How tall is the tower?"', "How tall is the tower?"),
        ("Visitor says: How tall is the tower?", "How tall is the tower?"),
        ("Elsie: how tall is the tower, then?", "how tall is the tower, then?"),
    ],
)
def test_user_input_cleaning(text: str, expected: str) -> None:
    assert clean_user_input(text, NAME) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ('""', "empty"),
        ("Tell me about {name}.", "debris"),
        ("<think>hmm</think> Why?", "debris"),
    ],
)
def test_user_input_rejects_malformed(text: str, reason: str) -> None:
    with pytest.raises(Malformed) as info:
        clean_user_input(text, NAME)
    assert info.value.reason == reason


def test_two_step_parts() -> None:
    assert (
        clean_analysis("Analysis: The user is wrong about the date.") == "The user is wrong about the date."
    )
    assert clean_analysis("Notes here.\nResponse: should not be here") == "Notes here."
    assert clean_response("Elsie: No, sir.", NAME) == "No, sir."
    assert clean_response("Response: No, sir.", NAME) == "No, sir."
    with pytest.raises(Malformed):
        clean_analysis("  ")


def test_debris_and_trimming() -> None:
    assert debris("A plain answer about the lamp.") is None
    assert debris('Then {"analysis": "x"}') == "JSON key"
    assert debris("ok </think> ok") == "think tag"
    assert trim_truncated("One. Two! Three") == "One. Two!"
    assert trim_truncated("One. Two.") == "One. Two."
    assert trim_truncated("no sentence end") == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sure! Here is the message:\nHow tall is the tower?", "How tall is the tower?"),
        ("Here's a possible question:\n\nHow tall is the tower?", "How tall is the tower?"),
        ("Here is your message. How tall is the tower?", "How tall is the tower?"),
        ("Here is the tower you asked about, is it tall?", "Here is the tower you asked about, is it tall?"),
        ("Sure enough, the tower is tall?", "Sure enough, the tower is tall?"),
    ],
)
def test_chatty_preambles_are_dropped(text: str, expected: str) -> None:
    assert clean_user_input(text, NAME) == expected


def test_repetition_loops_are_cut() -> None:
    looping = "The Pirate was sold to a merchant. It sank.\n\nThe Pirate was sold to a merchant. It sank."
    assert clean_response(looping, NAME) == "The Pirate was sold to a merchant. It sank."
    assert cut_repetition("No. No. No. I said no to him.") == "No. No. No. I said no to him."
    assert strip_preamble("Certainly. Why now?") == "Why now?"


def test_parse_topic_takes_the_phrase_out_of_what_a_small_model_says() -> None:
    from persllm.annotate.parse import parse_topic

    said = 'The topic of this text is "The Board\'s response to the matter of women keepers."'
    assert parse_topic(said) == "the Board's response to the matter of women keepers"
    assert parse_topic('This text is about the topic of "On trimming."') == "trimming"
    assert parse_topic("Fishing boats and the harbour") == "fishing boats and the harbour"
    for useless in ('The topic of this text is "The topic of this text is "', "", "What is the question?"):
        with pytest.raises(Malformed):
            parse_topic(useless)


def test_topic_questions_are_questions_about_the_topic() -> None:
    from persllm.annotate.parse import QUESTION_TEMPLATES, topic_question

    for kind, templates in QUESTION_TEMPLATES.items():
        asked = {topic_question("the harbour dues", kind, i / len(templates)) for i in range(len(templates))}
        assert len(asked) == len(templates)
        assert all("the harbour dues" in q and q.endswith("?") for q in asked)
