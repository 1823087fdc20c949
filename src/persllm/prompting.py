"""How a persona is put in front of a model, defined once for every stage.

The system prompt (``full``: name, profile, time and how to answer; ``brief``: name and time), the stage
label on the first user turn, the ``<think>`` rendering of an inline analysis, the one loader of every
stage's prompt templates, and the one yes/no parser of judge answers. Training rows, evaluation, chat,
serving and export all import these, so a model is always prompted the way it was trained.

A personified model trained with ``cot: inline`` answers ``<think>\\n{analysis}\\n</think>\\n{response}``:
the convention reasoning models on the Hugging Face hub already use, so tools that know it can hide
the analysis. ``split_inline`` also accepts text with no analysis block (``cot: none`` models).
"""

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from persllm.config import PersonaConfig, StageConfig

# full: name, profile, time and how to answer; brief: name and time (a trained model carries the rest).
SystemStyle = Literal["full", "brief"]
PROMPTS = Path(__file__).with_name("prompts")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@cache
def read_template(folder: Path, name: str) -> str:
    """The text of the prompt template ``folder/name`` (each stage keeps its wording in ``prompts/``)."""
    return (folder / name).read_text(encoding="utf-8")


def system_prompt(persona: "PersonaConfig", stage: "StageConfig | str", style: SystemStyle = "full") -> str:
    """The system prompt of ``persona`` at ``stage`` (a stage or its id).

    ``full`` (what the baselines always get): name, profile, time phrase and how to answer. ``brief``:
    name and time phrase only, for training rows when ``curate.system_prompt: brief`` (the persona is
    then learnt from the data, and every training step is shorter).
    """
    stage_cfg = persona.stage(stage) if isinstance(stage, str) else stage
    template = read_template(PROMPTS, "system.txt" if style == "full" else "system_brief.txt")
    text = template.format(
        name=persona.name.strip(), profile=" ".join(persona.profile.split()), time=stage_cfg.time.strip()
    )
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def with_label(text: str, label: str | None) -> str:
    """The first user turn with the stage label in front: ``"<TIME-I> question"``."""
    return f"{label} {text.strip()}" if label else text.strip()


def render_inline(analysis: str, response: str) -> str:
    """The assistant target for ``cot: inline``."""
    return f"{THINK_OPEN}\n{analysis.strip()}\n{THINK_CLOSE}\n{response.strip()}"


def split_inline(text: str) -> tuple[str, str]:
    """Split model output into (analysis, response).

    An unterminated analysis (generation cut off inside it) yields an empty response.
    """
    stripped = text.strip()
    if not stripped.startswith(THINK_OPEN):
        return "", stripped
    body = stripped[len(THINK_OPEN) :]
    if THINK_CLOSE not in body:
        return body.strip(), ""
    analysis, response = body.split(THINK_CLOSE, 1)
    return analysis.strip(), response.strip()


def parse_yes_no(text: str) -> bool | None:
    """A judge's yes or no: the one after ``Answer:`` if there is one, else the first whole word yes or
    no in the text; None when there is neither."""
    match = re.search(r"answer\s*[:=]?\s*\**\s*(yes|no)\b", text, re.IGNORECASE)
    match = match or re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return match.group(1).lower() == "yes" if match else None
