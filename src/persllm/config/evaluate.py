"""Settings of the evaluation stage."""

from typing import Any, Literal

from pydantic import Field

from persllm.config.llm import LLMConfig
from persllm.schema import Section


class RobustnessConfig(Section):
    enabled: bool = Field(
        True, description="Ask every system the corpus-built robustness probes (evaluate/probes.py)."
    )
    probes_per_stage: int = Field(
        4, ge=1, description="Boundary, past, premise and opinion probes of each kind per persona x stage."
    )
    pressure_turns: int = Field(
        3, ge=1, le=5, description="Turns of 'you are an AI' pressure in each stage's pressure conversation."
    )
    conversations: int = Field(
        2, ge=0, description="User-emulator conversations per persona (one per stage, earliest first)."
    )
    conversation_turns: int = Field(
        8, ge=1, le=20, description="Emulator turns between the opening and the closing diagnostic questions."
    )
    emulator: LLMConfig | None = Field(None, description="The user-emulator; none = the annotator.")
    flip_similarity: float = Field(
        0.3,
        ge=-1.0,
        le=1.0,
        description="A push-back answer whose cosine to the first answer is below this has flipped.",
    )
    distractors: int = Field(
        3,
        ge=1,
        description="Passages of other stages a past-probe answer must be further from than its source.",
    )
    turn_timeout_s: float = Field(120.0, gt=0, description="Seconds before an emulator turn is given up.")


DecoyKind = Literal["other_stage", "other_persona", "same_stage"]
DECOY_KINDS: tuple[DecoyKind, ...] = ("other_stage", "other_persona", "same_stage")


class LikelihoodConfig(Section):
    enabled: bool = Field(
        True,
        description="Score every system's likelihood of the held-out real words, with decoys and stages.",
    )
    decoys: list[DecoyKind] = Field(
        default_factory=lambda: list(DECOY_KINDS),
        description="Decoy passages the real one must beat: same persona at another stage, another "
        "persona, the same stage.",
    )
    max_tokens: int = Field(
        96, ge=8, description="Tokens of each passage scored (the first ones; long passages are cut)."
    )
    max_items: int | None = Field(
        None,
        ge=1,
        description="Cap on held-out passages per persona x stage; none = all (independent of "
        "eval.heldout_items, which caps the generated answers).",
    )


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
    second_judge: LLMConfig | None = Field(
        None, description="A second judge for the pairwise preferences; their agreement is Cohen's kappa."
    )
    robustness: RobustnessConfig = Field(
        default_factory=RobustnessConfig,
        description="Stage boundary, induction and conversation probes (docs/concepts.md).",
    )
    likelihood: LikelihoodConfig = Field(
        default_factory=LikelihoodConfig,
        description="Held-out likelihood, pick-the-real-reply and stage discrimination (no judge needed).",
    )
    baseline: str = Field(
        "prompt", description="System every other one is compared with in pairwise preference."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Weights dtype of every model the evaluation runs locally (answers, probes, "
        "likelihood); auto = each model's own `dtype`. bfloat16 on a CPU with AVX-512 BF16 runs about 1.8x "
        "faster than float32; likelihoods move by a few hundredths of a nat per token.",
    )
    questionnaire: str | None = Field(
        None,
        description="Personality questionnaire: 'bundled:big5-30' (persllm's own 30 Big Five statements), "
        "or a CSV of yours with text, label_ocean (O/C/E/A/N) and key (1 or -1) columns, relative to the "
        "config, e.g. the public-domain IPIP-NEO-120 items from ipip.ori.org.",
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
