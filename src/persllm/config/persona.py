"""The persona file: who the person is and the ordered stages of their life, each with its material."""

from datetime import date

from pydantic import Field, PrivateAttr, field_validator

from persllm.errors import UserError
from persllm.labels import default_label
from persllm.schema import Section

TRAITS = ("O", "C", "E", "A", "N")


class StageConfig(Section):
    id: str = Field(description="Stage id, unique within the persona, e.g. '1852-1860'.", min_length=1)
    time: str = Field(
        description="Time phrase the model is told, e.g. 'It is 1858, in Springfield, Illinois.'"
    )
    label: str | None = Field(
        None,
        description="Stage label put before the first user turn; default <TIME-I>, <TIME-II>, ... in "
        "order (plain text; with stage_labels.kind: reserved, the base's reserved tokens).",
    )
    knowledge: list[str] = Field(
        default_factory=list,
        description="Globs of objective material (biography, facts), relative to this file.",
    )
    style: list[str] = Field(
        default_factory=list,
        description="Globs of the person's own words (speeches, letters), relative to this file.",
    )
    dialogue: list[str] = Field(
        default_factory=list,
        description="Globs of the person's real exchanges in this stage (transcripts, chat exports); each "
        "reply of theirs trains as it is, with the turns before it.",
    )
    since: date | None = Field(
        None, description="First day of this stage, for the persona's dated `dialogue` files (YYYY-MM-DD)."
    )
    until: date | None = Field(
        None, description="Last day of this stage, for the persona's dated `dialogue` files (YYYY-MM-DD)."
    )
    inherits: bool = Field(False, description="Also retrieve from all earlier stages' material.")
    _label_given: bool = PrivateAttr(False)

    @field_validator("id")
    @classmethod
    def _id_is_plain(cls, value: str) -> str:
        if "/" in value or value.startswith(".") or value.strip() != value:
            raise ValueError("use a plain name without '/', leading dots or surrounding spaces")
        return value


class PersonaConfig(Section):
    id: str = Field(
        description="Persona id used in file names and model names, e.g. 'lincoln'.", min_length=1
    )
    name: str = Field(description="Display name, e.g. 'Abraham Lincoln'.")
    profile: str = Field("", description="Short profile: who this is, temperament, what they care about.")
    language: str = Field("en", description="Language of the material and of the dialogues.")
    stages: list[StageConfig] = Field(description="Ordered life stages, earliest first.", min_length=1)
    speakers: list[str] = Field(
        default_factory=list,
        description="The names this person speaks under in dialogue material (case-insensitive); none = "
        "`name`.",
    )
    dialogue: list[str] = Field(
        default_factory=list,
        description="Globs of timestamped chats (WhatsApp, Telegram, SillyTavern, JSONL with times) spread "
        "over the stages by their `since` / `until` dates.",
    )
    personality: dict[str, float] | None = Field(
        None, description="Optional target Big Five profile on a 1-5 scale, keys O, C, E, A, N."
    )

    @field_validator("id")
    @classmethod
    def _id_is_plain(cls, value: str) -> str:
        if not value.replace("-", "").replace("_", "").isalnum():
            raise ValueError("use letters, digits, '-' and '_' only")
        return value

    @field_validator("personality")
    @classmethod
    def _traits_known(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            unknown = sorted(set(value) - set(TRAITS))
            if unknown:
                raise ValueError(f"unknown trait {unknown[0]!r}; use O, C, E, A, N")
        return value

    @field_validator("stages")
    @classmethod
    def _unique_stages(cls, stages: list[StageConfig]) -> list[StageConfig]:
        # A field validator (not a model one) so the error is reported at the `stages` key.
        seen: set[str] = set()
        for index, stage in enumerate(stages):
            if stage.id in seen:
                raise ValueError(f"stage id {stage.id!r} appears twice; give each stage its own id")
            seen.add(stage.id)
            stage._label_given = stage.label is not None
            if stage.label is None:
                stage.label = default_label(index)
        labels = [stage.label for stage in stages]
        if len(set(labels)) != len(labels):
            raise ValueError("two stages share a label; give each stage its own `label`")
        return stages

    @property
    def speaker_names(self) -> list[str]:
        """The names that mark this person's turns in dialogue material."""
        return self.speakers or [self.name]

    def stage(self, stage_id: str) -> StageConfig:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        known = ", ".join(s.id for s in self.stages)
        raise UserError(f"persona {self.id!r} has no stage {stage_id!r}; use one of: {known}")

    def stage_index(self, stage_id: str) -> int:
        return [s.id for s in self.stages].index(self.stage(stage_id).id)
