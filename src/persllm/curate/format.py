"""How a personified dialogue is shown to the model: system prompt, stage label token, CoT rendering.

These pure functions are the single definition of the training-time format; evaluation, chat and
serving import them so a model is always prompted the way it was trained.
"""

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from persllm.cot import render_inline

if TYPE_CHECKING:  # persllm.config imports this package's config: no runtime import here
    from persllm.config import PersonaConfig, StageConfig

CotMode = Literal["inline", "none"]
# full: name, profile, time and how to answer; brief: name and time (a trained model carries the rest).
SystemStyle = Literal["full", "brief"]
PROMPTS = Path(__file__).with_name("prompts")
SYSTEM_TEMPLATES: dict[str, Path] = {"full": PROMPTS / "system.txt", "brief": PROMPTS / "system_brief.txt"}


@cache
def _system_template(style: SystemStyle) -> str:
    return SYSTEM_TEMPLATES[style].read_text(encoding="utf-8")


def system_prompt(persona: "PersonaConfig", stage: "StageConfig | str", style: SystemStyle = "full") -> str:
    """The system prompt of ``persona`` at ``stage`` (a stage or its id).

    ``full`` (what the baselines always get): name, profile, time phrase and how to answer. ``brief``:
    name and time phrase only, for training rows when ``curate.system_prompt: brief`` (the persona is
    then learnt from the data, and every training step is shorter).
    """
    stage_cfg = persona.stage(stage) if isinstance(stage, str) else stage
    text = _system_template(style).format(
        name=persona.name.strip(), profile=" ".join(persona.profile.split()), time=stage_cfg.time.strip()
    )
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def with_label(text: str, label: str | None) -> str:
    """The first user turn with the stage label token in front: ``"<TIME-I> question"``."""
    return f"{label} {text.strip()}" if label else text.strip()


def assistant_text(analysis: str, response: str, cot: CotMode) -> str:
    """The assistant target: ``<think>`` analysis then response (``inline``), or the response (``none``)."""
    if cot == "inline":
        return render_inline(analysis, response)
    return response.strip()


def dialogue_messages(turns: list[dict[str, Any]], label: str | None, cot: CotMode) -> list[dict[str, str]]:
    """Annotation turns as chat messages: label on the first user turn, every reply rendered for ``cot``."""
    messages: list[dict[str, str]] = []
    for index, turn in enumerate(turns):
        if turn["role"] == "user":
            content = with_label(turn["content"], label) if index == 0 else turn["content"].strip()
        else:
            content = assistant_text(turn.get("analysis", ""), turn["content"], cot)
        messages.append({"role": turn["role"], "content": content})
    return messages


def sft_row(
    record: dict[str, Any], persona: "PersonaConfig", cot: CotMode, style: SystemStyle = "full"
) -> dict[str, Any]:
    """One training row in TRL's ``messages`` form, with the record's provenance in ``meta``."""
    stage = persona.stage(record["stage"])
    messages = [{"role": "system", "content": system_prompt(persona, stage, style)}]
    messages += dialogue_messages(record["turns"], stage.label, cot)
    meta = {
        "id": record["id"],
        "persona": persona.id,
        "stage": stage.id,
        "kind": record.get("kind", "ordinary"),
        "label": stage.label,
    }
    return {"messages": messages, "meta": meta}
