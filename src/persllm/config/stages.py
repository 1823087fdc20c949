"""What each pipeline stage reads of the project file: one settings class per stage.

A stage's ``run`` takes its settings and the ``Workspace`` (personas and run folder), never the whole
project, so a stage cannot read a section it does not declare here, and ``persllm run`` fingerprints
exactly these fields (``StageSettings.config_keys``): change a section and the stages that read it run again.
"""

from dataclasses import dataclass, field, fields
from typing import ClassVar, Self

from persllm.config.annotate import AnnotateConfig
from persllm.config.curate import CurateConfig
from persllm.config.evaluate import EvalConfig
from persllm.config.llm import LLMConfig
from persllm.config.pairs import PairsConfig
from persllm.config.project import (
    CorpusConfig,
    EmbedderConfig,
    HoldoutConfig,
    Project,
    ProjectConfig,
    RetrievalConfig,
    StageLabelConfig,
    Workspace,
)
from persllm.config.train import DPOConfig, SFTConfig

# Training's base_model: only its weights count (switching the generation backend does not retrain).
TRAINED_BASE = {"fingerprint": ("model", "device", "dtype")}


class StageSettings:
    """A stage's sections of the project file (each subclass is a frozen dataclass of them)."""

    @classmethod
    def of(cls, config: ProjectConfig) -> Self:
        """The stage's settings, taken from the project's config."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})  # type: ignore[arg-type]

    @classmethod
    def of_project(cls, project: Project) -> tuple[Self, Workspace]:
        """``(settings, workspace)`` of a loaded project: the first arguments of the stage's ``run``."""
        return cls.of(project.config), project.workspace

    @classmethod
    def config_keys(cls) -> list[str]:
        """The config keys the stage reads (``base_model.model`` where only part of a section counts)."""
        keys: list[str] = []
        for f in fields(cls):  # type: ignore[arg-type]
            parts = f.metadata.get("fingerprint") or ()
            keys.extend([f"{f.name}.{part}" for part in parts] or [f.name])
        return keys


@dataclass(frozen=True)
class IndexSettings(StageSettings):
    corpus: CorpusConfig
    holdout: HoldoutConfig
    embedder: EmbedderConfig
    seed: int


@dataclass(frozen=True)
class AnnotateSettings(StageSettings):
    annotator: LLMConfig
    annotate: AnnotateConfig
    retrieval: RetrievalConfig
    embedder: EmbedderConfig
    seed: int


@dataclass(frozen=True)
class CurateSettings(StageSettings):
    curate: CurateConfig
    annotator: LLMConfig
    embedder: EmbedderConfig
    seed: int


@dataclass(frozen=True)
class PairsSettings(StageSettings):
    pairs: PairsConfig
    curate: CurateConfig
    annotator: LLMConfig
    annotate: AnnotateConfig
    base_model: LLMConfig
    retrieval: RetrievalConfig
    embedder: EmbedderConfig
    seed: int


@dataclass(frozen=True)
class SFTSettings(StageSettings):
    sft: SFTConfig
    curate: CurateConfig
    stage_labels: StageLabelConfig
    seed: int
    base_model: LLMConfig = field(metadata=TRAINED_BASE)

    stage: ClassVar[str] = "sft"

    @property
    def training(self) -> SFTConfig:
        return self.sft


@dataclass(frozen=True)
class DPOSettings(StageSettings):
    dpo: DPOConfig
    curate: CurateConfig
    stage_labels: StageLabelConfig
    seed: int
    base_model: LLMConfig = field(metadata=TRAINED_BASE)

    stage: ClassVar[str] = "dpo"

    @property
    def training(self) -> DPOConfig:
        return self.dpo


@dataclass(frozen=True)
class EvalSettings(StageSettings):
    eval: EvalConfig
    base_model: LLMConfig
    annotator: LLMConfig
    annotate: AnnotateConfig
    curate: CurateConfig
    corpus: CorpusConfig
    retrieval: RetrievalConfig
    embedder: EmbedderConfig
    seed: int
