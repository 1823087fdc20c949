"""Settings of the curation stage."""

from typing import Literal

from pydantic import Field

from persllm.schema import Section


class CurateConfig(Section):
    min_response_words: int = Field(5, ge=1, description="Shortest golden response kept.")
    max_response_words: int = Field(400, ge=1, description="Longest golden response kept.")
    min_analysis_words: int = Field(3, ge=0, description="Shortest analysis kept.")
    echo_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Drop a response when at least this share of its distinct words echo the user input.",
    )
    question_copy_max: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Own-words records: drop one whose question takes at least this share of its word "
        "4-grams from the passage (a copy, not a question).",
    )
    question_similarity_min: float = Field(
        0.25,
        ge=-1,
        le=1,
        description="Own-words records: drop one whose question's embedding cosine with the passage is "
        "below this (off topic).",
    )
    context_copy_max: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Annotator-written replies: drop one that takes at least this share of its word 6-grams "
        "from the retrieved context it was written from (a copy, not speech).",
    )
    grounding_min: float = Field(
        0.2,
        ge=-1,
        le=1,
        description="Annotator-written replies: drop one whose embedding cosine with its retrieved "
        "context is below this (not grounded in what the persona knows).",
    )
    annotator_min_kept: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Stop before training (exit 2) when a persona keeps less than this share of its "
        "annotator-written dialogues after the checks: the annotator cannot write this persona.",
    )
    dedup_threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Cosine of user-input embeddings at or above which records are duplicates.",
    )
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Held-out share per persona x stage x kind.")
    repeat: int = Field(1, ge=1, description="Times each personified training record is repeated.")
    general_data: str | None = Field(None, description="Optional JSONL of general `messages` to mix in.")
    general_ratio: float = Field(
        0.0, ge=0, description="General records per personified record in the training mix."
    )
    system_prompt: Literal["full", "brief"] = Field(
        "full",
        description="System prompt of the training rows, and so of the trained systems wherever they "
        "run: full = name, profile, time and how to answer; brief = name and time only (the persona is "
        "learnt from the data; each step is about half as long). The baselines always get full.",
    )
    cot: Literal["inline", "none"] = Field(
        "inline",
        description="inline: the target is <think>analysis</think> then the response; none: response.",
    )
