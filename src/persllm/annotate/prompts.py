"""Annotator prompts: pure functions from persona, stage, seed and dialogue to chat messages.

The wording lives in ``prompts/*.txt``; ``{name}``-style placeholders are filled in one pass, so text
that is itself inserted (a corpus passage with braces, say) is never re-scanned.
"""

import re
from pathlib import Path
from typing import Any

from persllm.config import PersonaConfig, StageConfig
from persllm.prompting import read_template

PROMPTS = Path(__file__).parent / "prompts"
KINDS = ("ordinary", "misleading", "opinion")
OUTPUTS = ("json", "delimited", "two_step")

# What the user's opinion paragraph does, relative to the persona (chosen per item).
STANCES = {
    "agree": "agree with {name} on the whole, while putting it in the user's own terms",
    "differ": "differ from {name}'s view on at least one point that matters",
    "conflict": "strongly conflict with something {name} believes or stands for",
}

REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "analysis": {"type": "string", "description": "Private notes before replying."},
        "response": {"type": "string", "description": "The in-character reply."},
    },
    "required": ["analysis", "response"],
    "additionalProperties": False,
}
# The ``response_format`` param in OpenAI's own shape, which every backend passes through unchanged.
REPLY_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "persona_reply", "schema": REPLY_SCHEMA, "strict": True},
}

LANGUAGES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ru": "Russian",
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
}

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
Messages = list[dict[str, str]]


def template(name: str) -> str:
    """The text of ``prompts/<name>.txt`` without its final newline."""
    return read_template(PROMPTS, f"{name}.txt").rstrip("\n")


def render(template_name: str, /, **values: object) -> str:
    """Fill the template's ``{placeholders}``; a placeholder with no value is a programming error."""

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"prompts/{template_name}.txt needs a value for {{{key}}}")
        return str(values[key])

    return _PLACEHOLDER.sub(fill, template(template_name))


def language_name(code: str) -> str:
    return LANGUAGES.get(code.lower(), code)


def persona_values(persona: PersonaConfig, stage: StageConfig) -> dict[str, str]:
    return {
        "name": persona.name,
        "profile": persona.profile.strip() or "(no profile given)",
        "time": stage.time.strip(),
        "language": language_name(persona.language),
    }


def render_dialogue(turns: list[dict[str, Any]], name: str) -> str:
    """The dialogue as ``User: ...`` / ``<name>: ...`` paragraphs (the analysis is never shown)."""
    lines = []
    for turn in turns:
        speaker = "User" if turn["role"] == "user" else name
        lines.append(f"{speaker}: {turn['content'].strip()}")
    return "\n\n".join(lines)


def or_none(text: str) -> str:
    return text.strip() or "(nothing found)"


def stance_text(stance: str, name: str) -> str:
    return STANCES[stance].format(name=name)


# --------------------------------------------------------------------------- user turns


def build_user_input_messages(
    persona: PersonaConfig, stage: StageConfig, kind: str, seed_text: str, stance: str = "differ"
) -> Messages:
    """Messages asking the annotator for the first user message of a dialogue of ``kind``.

    The stage's time phrase and the persona's name and profile are part of the prompt, so the user
    input fits the moment (the reference implementation left the time out here).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
    values = persona_values(persona, stage)
    stance_words = stance_text(stance, persona.name) if kind == "opinion" else ""
    task = render(f"kind_{kind}", name=persona.name, stance=stance_words)
    user = render("user_input", **values, seed=seed_text.strip(), task=task)
    return [{"role": "system", "content": render("system", **values)}, {"role": "user", "content": user}]


def build_follow_up_messages(
    persona: PersonaConfig, stage: StageConfig, kind: str, turns: list[dict[str, Any]]
) -> Messages:
    """Messages asking for the user's next turn: a challenge, a follow-up or a renewed attempt to mislead."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")
    values = persona_values(persona, stage)
    task = render(f"follow_up_{kind}", name=persona.name)
    user = render("follow_up", **values, dialogue=render_dialogue(turns, persona.name), task=task)
    return [{"role": "system", "content": render("system", **values)}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- golden replies


def build_reply_messages(
    persona: PersonaConfig,
    stage: StageConfig,
    turns: list[dict[str, Any]],
    knowledge: str,
    style: str,
    output: str = "delimited",
) -> Messages:
    """Messages asking for analysis + response in one call, as JSON or with ANALYSIS:/RESPONSE: labels."""
    if output not in ("json", "delimited"):
        raise ValueError(f"one-call replies are 'json' or 'delimited', not {output!r}")
    values = persona_values(persona, stage)
    user = render(
        "reply",
        **values,
        knowledge=or_none(knowledge),
        style=or_none(style),
        dialogue=render_dialogue(turns, persona.name),
        format=render(f"format_{output}", name=persona.name),
    )
    return [
        {"role": "system", "content": render("reply_system", **values)},
        {"role": "user", "content": user},
    ]


def build_analysis_messages(
    persona: PersonaConfig, stage: StageConfig, turns: list[dict[str, Any]], knowledge: str
) -> Messages:
    """Two-step fallback, first call: only the private analysis of the user's last message."""
    values = persona_values(persona, stage)
    user = render(
        "analysis_step",
        **values,
        knowledge=or_none(knowledge),
        dialogue=render_dialogue(turns, persona.name),
    )
    return [
        {"role": "system", "content": render("reply_system", **values)},
        {"role": "user", "content": user},
    ]


def build_response_messages(
    persona: PersonaConfig,
    stage: StageConfig,
    turns: list[dict[str, Any]],
    knowledge: str,
    style: str,
    analysis: str,
) -> Messages:
    """Two-step fallback, second call: the persona answers the real dialogue, guided by the analysis.

    The dialogue is passed as chat turns rather than described, because that is the one task even a
    very small instruction model does reliably: answer the last user message.
    """
    values = persona_values(persona, stage)
    system = render(
        "response_step",
        **values,
        knowledge=or_none(knowledge),
        style=or_none(style),
        analysis=analysis.strip(),
    )
    chat = [{"role": turn["role"], "content": turn["content"]} for turn in turns]
    return [{"role": "system", "content": system}, *chat]


# --------------------------------------------------------------------------- own words


def build_back_question_messages(
    persona: PersonaConfig, stage: StageConfig, kind: str, passage: str
) -> Messages:
    """Messages asking for the user turn that ``passage`` (the person's own words) answers.

    ``kind`` is ``ordinary`` (a question) or ``opinion`` (the visitor's view, which the passage answers).
    """
    if kind not in ("ordinary", "opinion"):
        raise ValueError(f"own-words dialogues are 'ordinary' or 'opinion', not {kind!r}")
    values = persona_values(persona, stage)
    task = render(f"back_kind_{kind}", name=persona.name)
    user = render("back_question", **values, passage=passage.strip(), task=task)
    return [{"role": "system", "content": render("system", **values)}, {"role": "user", "content": user}]


def build_user_turn_messages(
    persona: PersonaConfig, stage: StageConfig, kind: str, passage: str, question_style: str
) -> Messages:
    """The back-writing call of an own-words item: the whole question, or only the passage's topic."""
    if question_style == "topic":
        return build_back_topic_messages(passage)
    return build_back_question_messages(persona, stage, kind, passage)


def build_own_words_analysis_messages(
    persona: PersonaConfig, stage: StageConfig, question: str, reply: str
) -> Messages:
    """Messages asking for the private notes that lead from ``question`` to the person's own ``reply``."""
    values = persona_values(persona, stage)
    user = render("own_words_analysis", **values, question=question.strip(), reply=reply.strip())
    return [
        {"role": "system", "content": render("reply_system", **values)},
        {"role": "user", "content": user},
    ]


def build_back_topic_messages(passage: str) -> Messages:
    """Messages asking only for the topic of ``passage``: what a very small annotator can still do well."""
    return [{"role": "user", "content": render("back_topic", passage=passage.strip())}]
