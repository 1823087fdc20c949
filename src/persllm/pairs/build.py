"""Preference pairs as data: candidates, the pair filters and TRL's conversational row. All pure."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from persllm.curate.filters import reply_source, word_overlap
from persllm.curate.format import CotMode, assistant_text
from persllm.prompting import SystemStyle, system_prompt, with_label

if TYPE_CHECKING:
    from persllm.config import PersonaConfig

PROVENANCES = ("cross_stage", "cross_persona", "base_model")
OUTCOMES = ("candidates", "unavailable", "identical", "too_similar", "kept")


@dataclass
class Candidate:
    """A chosen record with one rejected answer, before filtering.

    ``rejected`` is (analysis, response); None when no rejected answer could be had (a malformed
    regeneration, no neighbour in the similarity range, an empty base-model reply).
    """

    provenance: str
    record: dict[str, Any]
    rejected: tuple[str, str] | None
    rejected_from: dict[str, Any] = field(default_factory=dict)


def opening(record: dict[str, Any]) -> tuple[str, str, str]:
    """(user input, analysis, response) of the exchange pairs are built on: a dialogue's first, a real
    exchange's last (its reply; the turns before it are context, see ``history``)."""
    user, reply = record["turns"][-2:] if is_real_exchange(record) else record["turns"][:2]
    return user["content"], reply.get("analysis", ""), reply["content"]


def is_real_exchange(record: dict[str, Any]) -> bool:
    return reply_source(record) == "dialogue"


def history(record: dict[str, Any]) -> list[dict[str, str]]:
    """The real turns before a real exchange's last user turn (none for other records)."""
    if not is_real_exchange(record):
        return []
    return [{"role": t["role"], "content": t["content"]} for t in record["turns"][:-2]]


def pair_problem(chosen: str, rejected: str, min_difference: float) -> str | None:
    """Why a (chosen, rejected) response pair teaches nothing, or None: the one place pairs are filtered."""
    if chosen.strip() == rejected.strip():
        return "identical"
    if 1.0 - word_overlap(chosen, rejected) < min_difference:
        return "too_similar"
    return None


def pair_row(
    candidate: Candidate, persona: "PersonaConfig", cot: CotMode, style: SystemStyle = "full"
) -> dict[str, Any]:
    """TRL's conversational preference row, prompted and rendered exactly like the SFT data."""
    assert candidate.rejected is not None
    record = candidate.record
    stage = persona.stage(record["stage"])
    question, analysis, response = opening(record)
    turns = [*history(record), {"role": "user", "content": question}]
    turns[0] = {"role": "user", "content": with_label(turns[0]["content"], stage.label)}
    prompt = [{"role": "system", "content": system_prompt(persona, stage, style)}, *turns]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": assistant_text(analysis, response, cot)}],
        "rejected": [{"role": "assistant", "content": assistant_text(*candidate.rejected, cot)}],
        "meta": {
            "provenance": candidate.provenance,
            "source_id": record["id"],
            "persona": persona.id,
            "stage": stage.id,
            "kind": record.get("kind", "ordinary"),
            "rejected_from": candidate.rejected_from,
        },
    }


def other_stages(persona: "PersonaConfig", stage_id: str, limit: int) -> list[str]:
    """Up to ``limit`` stages other than ``stage_id``, nearest in time first (earlier on a tie)."""
    ids = [stage.id for stage in persona.stages]
    here = ids.index(stage_id)
    others = sorted((i for i in range(len(ids)) if i != here), key=lambda i: (abs(i - here), i))
    return [ids[i] for i in others[:limit]]
