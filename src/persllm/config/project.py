"""The project file: every section's settings, and ``Project``, a loaded project with its personas."""

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from persllm.config.annotate import AnnotateConfig
from persllm.config.curate import CurateConfig
from persllm.config.evaluate import EvalConfig
from persllm.config.interact import ConverseConfig, ServeConfig
from persllm.config.llm import LLMConfig
from persllm.config.pairs import PairsConfig
from persllm.config.persona import PersonaConfig
from persllm.config.train import DPOConfig, SFTConfig
from persllm.errors import UserError
from persllm.layout import RunLayout
from persllm.schema import Section


class EmbedderConfig(Section):
    model: str = Field(
        "bundled:minilm",
        description="sentence-transformers folder or hub id; 'bundled:minilm' = all-MiniLM-L6-v2, offline.",
    )
    batch_size: int = Field(64, ge=1, description="Chunks encoded per batch.")
    device: str = Field("cpu", description="Device for the encoder: cpu, cuda, mps.")


class CorpusConfig(Section):
    max_words: int = Field(
        150, ge=10, description="Paragraphs longer than this are split at sentence boundaries."
    )
    max_file_mb: float = Field(
        20.0,
        gt=0,
        description="Largest corpus file read (MB); a larger one is refused with one line (split it). "
        "Measured: a 20 MB text file (48,000 paragraphs) indexed in 14 minutes at 1.3 GB peak on 2 cores.",
    )
    dialogue_context_turns: int = Field(
        3, ge=1, le=20, description="Exchanges of real context kept before each reply of dialogue material."
    )
    dialogue_gap_hours: float = Field(
        6.0, gt=0, description="A pause longer than this in a timestamped chat starts a new conversation."
    )


class HoldoutConfig(Section):
    share: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Share of each stage's style passages (own words) set aside for evaluation; 0 = none.",
    )
    min_passages: int = Field(2, ge=1, description="Fewest passages held out per stage (when share > 0).")
    max_passages: int | None = Field(
        None, ge=1, description="Most passages held out per stage; none = no cap."
    )
    min_train: int = Field(
        3, ge=1, description="Fewest style passages a stage must keep for training after the split."
    )
    min_words: int = Field(12, ge=1, description="Shortest passage that may be held out (words).")
    strict: bool = Field(
        False,
        description="A stage with too few style passages for the split is an error (exit 2), not a warning.",
    )


class RetrievalConfig(Section):
    knowledge_words: int = Field(1500, ge=0, description="Word budget of the knowledge context.")
    style_words: int = Field(500, ge=0, description="Word budget of the style context.")


class StageLabelConfig(Section):
    kind: Literal["text", "reserved", "new_tokens"] = Field(
        "text",
        description="How the stage label is written: text = plain text the base tokenizer already has "
        "(plain LoRA adapters that vLLM, llama.cpp and one shared base serve); reserved = one of the base "
        "vocabulary's unused special tokens (Llama 3, Gemma, ...); new_tokens = new special tokens whose "
        "embedding rows are trained (the adapter carries both embedding matrices; vLLM and llama.cpp "
        "LoRA refuse it, and it runs on a base model of its own).",
    )


class ProjectConfig(Section):
    project: str = Field(description="Project name; the run folder defaults to runs/<project>.", min_length=1)
    run_dir: str | None = Field(
        None, description="Run folder, relative to this file; default runs/<project>."
    )
    personas: list[str] = Field(
        description="Persona files (paths or globs), relative to this file.", min_length=1
    )
    seed: int = Field(42, description="Seed for sampling, splits and training.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="Sentence encoder.")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="Corpus chunking.")
    holdout: HoldoutConfig = Field(
        default_factory=HoldoutConfig,
        description="Own words held out before indexing: evaluation references only, never training data.",
    )
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="Context budgets.")
    annotator: LLMConfig = Field(default_factory=LLMConfig, description="The LLM that writes the dialogues.")
    annotate: AnnotateConfig = Field(
        default_factory=AnnotateConfig, description="Annotation counts and parsing."
    )
    curate: CurateConfig = Field(default_factory=CurateConfig, description="Filters, split and data mixing.")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Automated preference pairs.")
    base_model: LLMConfig = Field(default_factory=LLMConfig, description="The model to personify.")
    stage_labels: StageLabelConfig = Field(
        default_factory=StageLabelConfig, description="How a stage is marked in the first user turn."
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Direct preference optimisation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation against baselines.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Chat and the HTTP server.")
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named sets of overrides (dotted keys), chosen with `persllm run --preset NAME`.",
    )
    converse: ConverseConfig = Field(
        default_factory=ConverseConfig,
        description="Multi-agent conversations: named agents, judge, sampling.",
    )


@dataclass(frozen=True)
class Workspace:
    """Where a project's things live: the config file, the personas and the run folder. No settings: a
    stage gets this and its own settings (``persllm.config.stages``), never the whole project."""

    config_path: Path
    run_dir: Path
    personas: dict[str, PersonaConfig]
    persona_paths: dict[str, Path] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.config_path.parent

    @property
    def layout(self) -> RunLayout:
        """The paths of the run folder (``persllm.layout``)."""
        return RunLayout(self.run_dir)

    def persona(self, persona_id: str) -> PersonaConfig:
        if persona_id not in self.personas:
            known = ", ".join(self.personas)
            raise UserError(f"{self.config_path}: no persona {persona_id!r}; use one of: {known}")
        return self.personas[persona_id]

    def stage_files(self, persona_id: str, stage_id: str, kind: str) -> list[Path]:
        """The corpus files of one stage's ``kind`` ('knowledge', 'style' or 'dialogue'), sorted."""
        stage = self.persona(persona_id).stage(stage_id)
        return expand_globs(getattr(stage, kind), self.persona_paths[persona_id].parent)

    def dated_dialogue_files(self, persona_id: str) -> list[Path]:
        """The persona's timestamped chats, spread over its stages by date, sorted."""
        return expand_globs(self.persona(persona_id).dialogue, self.persona_paths[persona_id].parent)


@dataclass
class Project:
    """A loaded project: its validated config and its workspace (personas and where things live)."""

    config: ProjectConfig
    config_path: Path
    personas: dict[str, PersonaConfig]
    persona_paths: dict[str, Path] = field(default_factory=dict)

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.config_path, self.run_dir, self.personas, self.persona_paths)

    @property
    def root(self) -> Path:
        return self.config_path.parent

    @property
    def run_dir(self) -> Path:
        return self.root / (self.config.run_dir or f"runs/{self.config.project}")

    @property
    def layout(self) -> RunLayout:
        """The paths of the run folder (``persllm.layout``)."""
        return RunLayout(self.run_dir)

    def persona(self, persona_id: str) -> PersonaConfig:
        return self.workspace.persona(persona_id)

    def resolved(self) -> dict[str, Any]:
        """The resolved config as plain data, for manifests."""
        return {
            "project": self.config.model_dump(mode="json"),
            "personas": {pid: p.model_dump(mode="json") for pid, p in self.personas.items()},
        }


def expand_globs(patterns: list[str], base: Path) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        files.update(Path(os.path.normpath(p)) for p in glob.glob(full, recursive=True) if Path(p).is_file())
    return sorted(files)
