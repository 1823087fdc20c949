"""Settings of the annotation stage."""

from typing import Literal

from pydantic import Field

from persllm.schema import Section


class KindCounts(Section):
    ordinary: int = Field(default=4, ge=0, description="Ordinary questions per stage.")
    misleading: int = Field(default=2, ge=0, description="False-premise or contrary questions per stage.")
    opinion: int = Field(default=2, ge=0, description="Opinion paragraphs per stage, inviting argument.")


class OwnWordsShare(Section):
    ordinary: float = Field(
        default=0.75, ge=0, le=1, description="Share of the ordinary dialogues answered in own words."
    )
    opinion: float = Field(
        default=0.5, ge=0, le=1, description="Share of the opinion dialogues answered in own words."
    )


class AnnotateConfig(Section):
    counts: KindCounts = Field(default_factory=KindCounts, description="Dialogues per stage and kind.")
    multi_turn_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Share of dialogues continued with generated follow-up user turns.",
    )
    max_follow_ups: int = Field(default=2, ge=0, description="Follow-up user turns in a multi-turn dialogue.")
    own_words_share: OwnWordsShare | None = Field(
        default=None,
        description=(
            "Per kind, the share of dialogues whose reply is a passage of the person's own words (style "
            "material) with a back-written user turn; misleading dialogues always get an annotator reply. "
            "None = ordinary 0.75, opinion 0.5 with a bundled (small) annotator, else 0."
        ),
    )

    def own_words_shares(self, annotator_model: str) -> dict[str, float]:
        """The share of own-words dialogues per kind, with the default resolved for ``annotator_model``."""
        if self.own_words_share is not None:
            return self.own_words_share.model_dump()
        return OwnWordsShare().model_dump() if annotator_model.startswith("bundled:") else {}

    question_style: Literal["question", "topic"] | None = Field(
        default=None,
        description=(
            "How own-words and held-out user turns are written: question = the annotator writes the "
            "question; topic = it names the passage's topic and a template asks about it (reliable even at "
            "135M). None = topic with a bundled annotator, else question."
        ),
    )

    def resolved_question_style(self, annotator_model: str) -> str:
        if self.question_style is not None:
            return self.question_style
        return "topic" if annotator_model.startswith("bundled:") else "question"

    own_words_max_words: int = Field(
        default=90,
        ge=10,
        description="Own-words replies and held-out references are cut at sentence ends to this length.",
    )
    own_words_min_words: int = Field(
        default=12, ge=1, description="Shortest style passage used as an own-words reply (words)."
    )
    own_words_analysis: bool = Field(
        default=True,
        description="Write a short analysis (CoT) for own-words replies; off saves a call each (cot: none).",
    )
    heldout_questions: bool = Field(
        default=True,
        description="Back-write a question for every held-out passage: the items of the held-out evaluation.",
    )
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
