"""A curated dialogue as a training row: the persona's system prompt (``persllm.prompting``), the stage
label on the first user turn, every reply rendered for the ``cot`` mode.
"""

from typing import TYPE_CHECKING, Any, Literal

from persllm.prompting import SystemStyle, render_inline, system_prompt, with_label

if TYPE_CHECKING:
    from persllm.config import PersonaConfig

CotMode = Literal["inline", "none"]
__all__ = ["CotMode", "assistant_text", "dialogue_messages", "sft_row"]


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
