"""Settings of the preference-pair stage."""

from pydantic import Field, model_validator

from persllm.schema import Section


class PairsConfig(Section):
    cross_stage: bool = Field(True, description="Rejected = the same input answered as another stage.")
    cross_persona: bool = Field(
        True, description="Rejected = another persona's reply to the most similar input."
    )
    base_model: bool = Field(False, description="Rejected = the base model's un-personified reply.")
    similarity_min: float = Field(
        0.3, ge=-1, le=1, description="Lowest input cosine for a cross-persona pair."
    )
    similarity_max: float = Field(
        0.98, ge=-1, le=1, description="Highest input cosine for a cross-persona pair."
    )
    min_difference: float = Field(
        0.2, ge=0, le=1, description="Smallest 1 - word-overlap between chosen and rejected."
    )
    cross_stage_max: int = Field(
        2, ge=1, description="Other stages each record is re-answered as (nearest in time first)."
    )

    @model_validator(mode="after")
    def _range_ordered(self) -> "PairsConfig":
        if self.similarity_min > self.similarity_max:
            raise ValueError("similarity_min is above similarity_max; make the range non-empty")
        return self
