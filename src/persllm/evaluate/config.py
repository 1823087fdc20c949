"""Settings of the evaluation stage."""

from typing import Any

from pydantic import Field

from persllm.llm.config import LLMConfig
from persllm.schema import Section


class EvalConfig(Section):
    systems: list[str] = Field(
        default_factory=lambda: ["prompt", "rag", "sft", "sft+dpo"],
        description="Systems to compare: prompt, rag, sft, sft+dpo, and names from `extra_systems`.",
    )
    extra_systems: dict[str, LLMConfig] = Field(
        default_factory=dict, description="More systems by name: any model or endpoint."
    )
    judge: LLMConfig | None = Field(
        None, description="Judge model for 0-5 ratings and preferences; none = off."
    )
    judge_params: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.0, "max_tokens": 64},
        description="The judge's sampling settings.",
    )
    baseline: str = Field(
        "prompt", description="System every other one is compared with in pairwise preference."
    )
    questionnaire: str | None = Field(
        None, description="CSV with text, trait and key columns (e.g. IPIP-120)."
    )
    questionnaire_items: int | None = Field(
        None,
        ge=1,
        description="Ask at most this many questionnaire items (spread over the traits); none = all.",
    )
    max_items: int | None = Field(
        None, ge=1, description="Cap on annotator test items (sft_test.jsonl) per persona x stage."
    )
    heldout_items: int | None = Field(
        None, ge=1, description="Cap on held-out own-words items per persona x stage; none = all."
    )
    resamples: int = Field(
        1000, ge=1000, description="Bootstrap resamples of the items for the 95% intervals."
    )
    samples: int = Field(2, ge=1, description="Samples per item (the Intra distinction needs two).")
    params: dict[str, float | int] = Field(
        default_factory=lambda: {"temperature": 0.7, "max_tokens": 160}, description="Sampling settings."
    )
