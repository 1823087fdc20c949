"""Settings of the annotation stage."""

from typing import Literal

from pydantic import Field

from persllm.schema import Section


class KindCounts(Section):
    ordinary: int = Field(default=4, ge=0, description="Ordinary questions per stage.")
    misleading: int = Field(default=2, ge=0, description="False-premise or contrary questions per stage.")
    opinion: int = Field(default=2, ge=0, description="Opinion paragraphs per stage, inviting argument.")


class AnnotateConfig(Section):
    counts: KindCounts = Field(default_factory=KindCounts, description="Dialogues per stage and kind.")
    multi_turn_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Share of dialogues continued with generated follow-up user turns.",
    )
    max_follow_ups: int = Field(default=2, ge=0, description="Follow-up user turns in a multi-turn dialogue.")
    output: Literal["auto", "json", "delimited", "two_step"] = Field(
        default="auto",
        description=(
            "Reply format: json (schema), delimited (ANALYSIS:/RESPONSE:), two_step (two calls); auto = json "
            "where the backend supports it, else delimited first and two_step on retries."
        ),
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Attempts per output before it is counted as malformed (not written).",
    )
