"""Record validation: every check is a pure function of one annotation record and the curation settings.

A record fails on the first check it does not pass, in the order of ``CHECKS``, so each removed record is
counted exactly once and the counts in ``stats.json`` add up.
"""

import re
from typing import Any

from persllm.config.curate import CurateConfig

# The order in which records are checked; "off_topic" (own-words questions, by embedding) and
# "duplicate" (dedup) run afterwards on the survivors.
CHECKS = (
    "malformed",
    "unknown_stage",
    "empty",
    "short_response",
    "long_response",
    "short_analysis",
    "echo",
    "not_question",
    "copies_passage",
    "prompt_words",
    "not_addressed",
    "not_first_person",
    "copies_context",
)
# "ungrounded" (annotator replies, by embedding) runs with "off_topic", after the checks above.
REMOVALS = (*CHECKS, "off_topic", "ungrounded", "duplicate")
# What an annotator-written dialogue must not contain: a retrieval reference ("[corpus/x.md:7]",
# "notes.txt:12") is the prompt's scaffolding, never the person's speech.
REFERENCE = re.compile(r"\[[^\]\n]{0,200}:\d+\]|\b[\w./-]+\.(?:md|txt|jsonl?|json):\d+")
SECOND_PERSON = {"you", "your", "yours", "yourself", "thou", "thee", "thy"}
FIRST_PERSON = {"i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves", "i'm", "i've"}
PROMPT_SPAN = 6  # words in a row shared with an annotator prompt that make a reply a prompt echo

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters and digits, any script)."""
    return _WORD.findall(text.lower())


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the word sets of ``a`` and ``b``: 1.0 for the same words, 0.0 for none shared."""
    set_a, set_b = set(words(a)), set(words(b))
    if not set_a and not set_b:
        return 1.0
    return len(set_a & set_b) / len(set_a | set_b)


def echo_share(user: str, response: str) -> float:
    """Share of the response's distinct words that the user input already contains (1.0: pure echo)."""
    said, answered = set(words(user)), set(words(response))
    return len(answered & said) / len(answered) if answered else 1.0


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def copied_share(question: str, passage: str, n: int = 4) -> float:
    """Share of the question's word ``n``-grams found in the passage (1.0: copied from it)."""
    asked = ngrams(question, n)
    return len(asked & ngrams(passage, n)) / len(asked) if asked else 0.0


# Replies the person really wrote: their own words (with a back-written question) and real exchanges.
REAL_SOURCES = ("own_words", "dialogue")


def reply_source(record: dict[str, Any]) -> str:
    """Where the reply came from: ``own_words``, ``dialogue``, else ``annotator`` (also older records)."""
    reply = record.get("reply")
    return str(reply.get("source", "annotator")) if isinstance(reply, dict) else "annotator"


def exchanges(turns: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(user turn, assistant turn) pairs of a well-formed dialogue: user, assistant, user, assistant, ..."""
    return [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]


def is_well_formed(record: dict[str, Any]) -> bool:
    """Alternating user/assistant turns with string contents, starting with the user, ending with a reply."""
    turns = record.get("turns")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        return False
    if not all(isinstance(key, str) and key for key in (record.get("id"), record.get("stage"))):
        return False
    for index, turn in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or turn.get("role") != role or not isinstance(turn.get("content"), str):
            return False
        if role == "assistant" and not isinstance(turn.get("analysis", ""), str):
            return False
    return True


def check_record(
    record: dict[str, Any],
    cfg: CurateConfig,
    stages: set[str] | None = None,
    prompt_spans: set[tuple[str, ...]] | None = None,
) -> str | None:
    """The name of the first check ``record`` fails (one of ``CHECKS``), or None if it passes them all.

    ``stages``: the persona's stage ids; a record of a stage since removed from the persona is dropped.
    An analysis is required only when the training data shows it (``cot: inline``). Own-words records
    are also checked as back-written questions: a question, not a copy of the passage. Annotator-written
    dialogues are checked as speech (``annotator_problem``); ``prompt_spans`` are the annotator prompts'
    word spans that no written turn may repeat.
    """
    if not is_well_formed(record):
        return "malformed"
    if stages is not None and record["stage"] not in stages:
        return "unknown_stage"
    pairs = exchanges(record["turns"])
    needs_analysis = cfg.cot == "inline"
    for user, reply in pairs:
        if (
            not user["content"].strip()
            or not reply["content"].strip()
            or (needs_analysis and not reply.get("analysis", "").strip())
        ):
            return "empty"
    for _, reply in pairs:
        if len(words(reply["content"])) < cfg.min_response_words:
            return "short_response"
    for _, reply in pairs:
        if len(words(reply["content"])) > cfg.max_response_words:
            return "long_response"
    for _, reply in pairs:
        if needs_analysis and len(words(reply["analysis"])) < cfg.min_analysis_words:
            return "short_analysis"
    for user, reply in pairs:
        if echo_share(user["content"], reply["content"]) >= cfg.echo_threshold:
            return "echo"
    if reply_source(record) == "own_words":
        question, passage = pairs[0][0]["content"], pairs[0][1]["content"]
        if "?" not in question:
            return "not_question"
        if copied_share(question, passage) >= cfg.question_copy_max:
            return "copies_passage"
        if REFERENCE.search(question) or repeats_prompt(question, prompt_spans or set()):
            return "prompt_words"
    if reply_source(record) == "annotator":
        return annotator_problem(record, cfg, prompt_spans or set())
    return None


def annotator_problem(
    record: dict[str, Any], cfg: CurateConfig, prompt_spans: set[tuple[str, ...]]
) -> str | None:
    """Why an annotator-written dialogue is not speech to and by the persona, or None.

    Every turn is free of prompt wording and reference markers; every user turn speaks to the persona (a
    question, or words addressed to "you"), not about them; every reply is in the first person; no reply
    copies the retrieved context it was written from.
    """
    pairs = exchanges(record["turns"])
    said = [text for user, reply in pairs for text in (user["content"], reply["content"])]
    if any(REFERENCE.search(text) or repeats_prompt(text, prompt_spans) for text in said):
        return "prompt_words"
    if any(
        "?" not in user["content"] and not SECOND_PERSON & set(words(user["content"])) for user, _ in pairs
    ):
        return "not_addressed"
    if any(not FIRST_PERSON & set(words(reply["content"])) for _, reply in pairs):
        return "not_first_person"
    context = record.get("context") or {}
    source = " ".join(str(context.get(key) or "") for key in ("knowledge", "style"))
    if any(copied_share(reply["content"], source, 6) >= cfg.context_copy_max for _, reply in pairs):
        return "copies_context"
    return None


def prompt_word_spans(templates: list[str]) -> set[tuple[str, ...]]:
    """Every ``PROMPT_SPAN``-word sequence of the annotator's prompt templates, placeholders left out."""
    spans: set[tuple[str, ...]] = set()
    for template in templates:
        for piece in re.split(r"\{[^}]*\}", template):
            spans |= ngrams(piece, PROMPT_SPAN)
    return spans


def repeats_prompt(text: str, spans: set[tuple[str, ...]]) -> bool:
    return bool(spans) and not ngrams(text, PROMPT_SPAN).isdisjoint(spans)
