"""Parsing annotator output, forgiving of what small local models do to a format.

Every function is pure and either returns clean text or raises ``Malformed`` with a short reason
(``unparseable``, ``missing_label``, ``empty``, ``debris``, ``truncated``, ``out_of_character``) that the
engine counts. Malformed output is retried and, failing that, reported; it never becomes a record.
"""

import json
import re
from typing import Any

REASONS = ("unparseable", "missing_label", "empty", "debris", "truncated", "out_of_character")


class Malformed(ValueError):
    """Annotator output that cannot become part of a record."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_SPECIAL = re.compile(r"(<\|(?:im_end|endoftext|eot_id|end)\|>|</s>)\s*$")
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_QUOTES = [('"', '"'), ("“", "”"), ("'", "'"), ("«", "»")]

# A section label at the start of a line: "ANALYSIS:", "**Response:**", "### Analysis", "2. Reply -".
_LINE_LABEL = re.compile(
    r"^[ \t>#*_\-]*(?:\d+[.)][ \t]*)?[*_]*(?P<label>analysis|response|reply|answer)[*_]*[ \t]*"
    r"(?:[:：\-–—]|(?=[ \t*_]*$))[ \t*_]*",
    re.IGNORECASE | re.MULTILINE,
)
_INLINE_RESPONSE = re.compile(r"\bRESPONSE[*_]*\s*[:：][ \t*_]*")

# Text that must never reach a record: chat tokens, prompt scaffolding, unfilled placeholders.
_DEBRIS = [
    (re.compile(r"<\|[^|<>]{1,40}\|>"), "chat-template token"),
    (re.compile(r"</?think>", re.IGNORECASE), "think tag"),
    (
        re.compile(
            r"\{(?:name|profile|time|seed|task|dialogue|knowledge|style|analysis|format|language|stance)\}"
        ),
        "unfilled placeholder",
    ),
    (
        re.compile(r"^[ \t>#*_]*(?:ANALYSIS|RESPONSE)[*_]*[ \t]*[:：]", re.IGNORECASE | re.MULTILINE),
        "section label",
    ),
    (re.compile(r"\b(?:ANALYSIS|RESPONSE):"), "section label"),
    (
        re.compile(
            r"^#+[ \t]*(?:Who|When|The task|The conversation so far|What .{1,60} knows at this time|"
            r"How .{1,60} speaks)",
            re.MULTILINE,
        ),
        "prompt heading",
    ),
    (re.compile(r"\(the private notes\)|'s reply to the user\)", re.IGNORECASE), "format placeholder"),
    (re.compile(r"\"(?:analysis|response)\"\s*:"), "JSON key"),
]
_OUT_OF_CHARACTER = re.compile(
    r"\bas an AI\b|\bI(?:'m| am) an AI\b|\b(?:AI|large) language model\b|\bI(?:'m| am) a language model\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*")
_SENTENCE = re.compile(r"[^.!?…\n]+(?:[.!?…]+|$)", re.MULTILINE)
# "Sure! Here is the message:" and the like, which chat models put before what was asked for.
_PREAMBLE = re.compile(
    r"^(?:(?:sure|okay|ok|certainly|of course)\b[,!.]?[ \t]*)?"
    r"(?:here(?:'s| is| are)\b[^\n:.!]{0,80}\b"
    r"(?:message|question|reply|response|answer|paragraph|notes?|analysis|version|attempt)\b"
    r"[^\n:.!]{0,40}[:.!][ \t]*\n?|(?:sure|okay|certainly|of course)[!.](?=\s))\s*",
    re.IGNORECASE,
)


# --------------------------------------------------------------------------- small cleaners


def strip_wrapping(text: str) -> str:
    """Remove end-of-turn tokens, a code fence, bold markers and quotation marks around the whole text."""
    text = _SPECIAL.sub("", text.strip()).strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    changed = True
    while changed and len(text) >= 2:
        changed = False
        if text.startswith("**") and text.endswith("**") and len(text) > 4:
            text, changed = text[2:-2].strip(), True
        for left, right in _QUOTES:
            inner = text[len(left) : -len(right)]
            if text.startswith(left) and text.endswith(right) and left not in inner and right not in inner:
                text, changed = inner.strip(), True
    return text


def strip_speaker(text: str, speakers: list[str]) -> str:
    """Drop one leading ``Speaker:`` label (``User:``, ``Elsie Wren:``, ``**Question:**``)."""
    names = "|".join(re.escape(s) for s in speakers if s)
    if not names:
        return text
    pattern = re.compile(
        rf"^[*_]*(?:the )?(?:{names})(?:'s (?:message|reply|answer|question|words))?(?: (?:is|asks|says))?"
        r"[*_]*[ \t]*[:：][*_]*[ \t]*",
        re.IGNORECASE,
    )
    return pattern.sub("", text, count=1).strip()


def strip_preamble(text: str) -> str:
    """Drop a leading "Sure! Here is the message:" the model added before the text it was asked for."""
    return _PREAMBLE.sub("", text.lstrip(), count=1).strip()


def cut_repetition(text: str) -> str:
    """Cut the text where a sentence of four or more words comes back (a small model's loop)."""
    seen: set[str] = set()
    for match in _SENTENCE.finditer(text):
        key = " ".join(match.group().lower().split())
        if len(key.split()) >= 4 and key in seen:
            return text[: match.start()].rstrip()
        seen.add(key)
    return text


def debris(text: str) -> str | None:
    """What kind of template debris ``text`` contains, or None when it is clean."""
    for pattern, what in _DEBRIS:
        if pattern.search(text):
            return what
    return None


def trim_truncated(text: str) -> str:
    """Cut text that hit the token limit back to its last complete sentence ('' if there is none)."""
    text = text.rstrip()
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return ""
    if ends[-1].end() == len(text):
        return text
    return text[: ends[-1].end()].rstrip()


def finish(text: str, truncated: bool) -> str:
    """Apply ``trim_truncated`` when the model stopped at its token limit; nothing left is ``truncated``."""
    if not truncated:
        return text
    trimmed = trim_truncated(text)
    if not trimmed:
        raise Malformed("truncated", "the output hit max_tokens before finishing a sentence")
    return trimmed


# --------------------------------------------------------------------------- user turns and single parts


def clean_user_input(text: str, persona_name: str, truncated: bool = False) -> str:
    """A generated user message: labels and quotes removed, cut before any invented reply."""
    first_name = persona_name.split()[0] if persona_name.split() else persona_name
    # A leading persona label is dropped too: "Ada:" alone is an empty message, not a question.
    speakers = ["User", "Question", "Message", "Visitor", persona_name, first_name]
    body = strip_wrapping(strip_speaker(strip_preamble(strip_wrapping(text)), speakers))
    body = _cut_at_speaker(body, [persona_name, first_name, "Answer", "Response"])
    body = finish(strip_wrapping(cut_repetition(body)), truncated)
    if not body:
        raise Malformed("empty", "no user message in the output")
    found = debris(body)
    if found:
        raise Malformed("debris", f"user message contains template debris ({found})")
    return body


def clean_analysis(text: str, truncated: bool = False, cut_reply: bool = True) -> str:
    """An analysis: a leading label dropped, cut before a reply the model went on to write (``cut_reply``)."""
    body = strip_preamble(strip_wrapping(text))
    label = _LINE_LABEL.match(body)
    if label and label.group("label").lower() == "analysis":
        body = body[label.end() :]
    if cut_reply:
        body = _cut_at_label(body, ("response", "reply", "answer"))
    body = finish(strip_wrapping(cut_repetition(body)), truncated)
    if not body:
        raise Malformed("empty", "empty analysis")
    found = debris(body)
    if found:
        raise Malformed("debris", f"analysis contains template debris ({found})")
    return body


def clean_response(text: str, persona_name: str, truncated: bool = False) -> str:
    """An in-character response: speaker label dropped, cut before any invented next user turn, checked."""
    first_name = persona_name.split()[0] if persona_name.split() else persona_name
    speakers = [persona_name, first_name, "Response", "Reply", "Answer"]
    body = strip_speaker(strip_preamble(strip_wrapping(text)), speakers)
    body = _cut_at_speaker(body, ["User", "Visitor"])
    body = finish(strip_wrapping(cut_repetition(body)), truncated)
    if not body:
        raise Malformed("empty", "empty response")
    found = debris(body)
    if found:
        raise Malformed("debris", f"response contains template debris ({found})")
    if _OUT_OF_CHARACTER.search(body):
        raise Malformed("out_of_character", "the response speaks as an AI, not as the persona")
    return body


def _cut_at_speaker(text: str, speakers: list[str]) -> str:
    names = "|".join(re.escape(s) for s in speakers if s)
    match = re.search(rf"\n[ \t]*[*_]*(?:{names})[*_]*[ \t]*:", text, re.IGNORECASE)
    return text[: match.start()].strip() if match else text


def _cut_at_label(text: str, labels: tuple[str, ...]) -> str:
    for match in _LINE_LABEL.finditer(text):
        if match.start() > 0 and match.group("label").lower() in labels:
            return text[: match.start()].strip()
    return text


# --------------------------------------------------------------------------- one-call replies


def parse_json_reply(text: str, persona_name: str, truncated: bool = False) -> tuple[str, str]:
    """``(analysis, response)`` from a JSON object (code fences and surrounding chatter tolerated)."""
    obj = load_object(strip_wrapping(text))
    if obj is None:
        raise Malformed("unparseable", "no JSON object in the output")
    fields = {str(key).strip().lower(): value for key, value in obj.items()}
    analysis = fields.get("analysis")
    response = next((fields[k] for k in ("response", "reply", "answer") if k in fields), None)
    if not isinstance(analysis, str) or not isinstance(response, str):
        raise Malformed("unparseable", 'the JSON object needs string fields "analysis" and "response"')
    # JSON that parsed was not cut off, whatever the finish reason says.
    return clean_analysis(analysis, cut_reply=False), clean_response(response, persona_name)


def load_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text``, or None."""
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    start = text.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def parse_delimited_reply(text: str, persona_name: str, truncated: bool = False) -> tuple[str, str]:
    """``(analysis, response)`` from ``ANALYSIS: ... RESPONSE: ...`` in any case, bold, heading or list form.

    Text before a RESPONSE label with no ANALYSIS label counts as the analysis.
    """
    body = strip_wrapping(text)
    labels = list(_LINE_LABEL.finditer(body))
    analysis_label = next((m for m in labels if m.group("label").lower() == "analysis"), None)
    after = analysis_label.end() if analysis_label else 0
    later = [m for m in labels if m.start() >= after and m.group("label").lower() != "analysis"]
    response_label = next((m for m in later if m.group("label").lower() == "response"), None)
    response_label = response_label or (later[0] if later else None)
    if response_label is None:
        response_label = _INLINE_RESPONSE.search(body, after)
    if response_label is None:
        raise Malformed("missing_label", "no RESPONSE: label in the output")
    analysis = body[after : response_label.start()]
    response = _cut_at_label(body[response_label.end() :], ("analysis", "response"))
    return clean_analysis(analysis, cut_reply=False), clean_response(response, persona_name, truncated)


# --------------------------------------------------------------------------- back-written questions

_QUOTED = re.compile(r"[\"“«]([^\"”»\n]{3,80})[\"”»]")
_TOPIC_LEAD = re.compile(
    r"^(?:.*?\b(?:topic|subject)\b[^:\"“]*?(?:\bis\b|:)|.*?\bis about\b|.*?\babout\b)\s*(?:the topic of\s*)?",
    re.IGNORECASE,
)
_TOPIC_WORDS = re.compile(r"\b(?:topic|text|question|passage|answer|author|writer)\b", re.IGNORECASE)
MAX_TOPIC_WORDS = 16


def parse_topic(text: str) -> str:
    """The noun phrase a model gave as a passage's topic ('The topic of this text is "X."' -> 'X').

    Raises ``Malformed`` (``unparseable``) when no usable phrase is left: too short, too long, or still
    about the text rather than its subject.
    """
    body = strip_wrapping(text).strip()
    quoted = _QUOTED.search(body)
    topic = quoted.group(1) if quoted else _TOPIC_LEAD.sub("", body.split("\n")[0], count=1)
    topic = re.split(r"(?<=[^.]{3})[.!?;](?:\s|$)", topic.strip())[0]
    topic = topic.strip(" \t.,;:!?\"'“”‘’*")
    topic = re.sub(r"^(?:the topic of|on|about|regarding)\s+", "", topic, flags=re.IGNORECASE).strip()
    if topic.lower().startswith("the "):
        topic = "the " + topic[4:]
    words = topic.split()
    if not 1 <= len(words) <= MAX_TOPIC_WORDS or _TOPIC_WORDS.search(topic) or debris(topic):
        raise Malformed("unparseable", f"no topic phrase in {body[:60]!r}")
    return topic[0].lower() + topic[1:] if words[0][1:].islower() and words[0] not in ("I",) else topic


QUESTION_TEMPLATES = {
    "ordinary": (
        "What can you tell me about {topic}?",
        "What do you make of {topic}?",
        "Would you tell me what you think of {topic}?",
        "How do you see {topic}?",
    ),
    "opinion": (
        "If you ask me, {topic} is more trouble than it is worth. What do you think?",
        "I have always thought {topic} matters more than people admit. Do you agree?",
        "People say too much fuss is made about {topic}. Are they right?",
    ),
}


def topic_question(topic: str, kind: str, pick: float) -> str:
    """A user turn about ``topic`` from the ``kind``'s templates; ``pick`` in [0, 1) chooses one."""
    choices = QUESTION_TEMPLATES[kind]
    return choices[int(pick * len(choices))].format(topic=topic)
