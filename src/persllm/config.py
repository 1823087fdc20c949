"""Project and persona configuration: typed models, YAML loading, overrides and one-line errors.

Precedence is defaults < YAML < CLI overrides (dotted keys such as ``annotate.counts.ordinary``).
Every user mistake becomes a ``UserError`` naming the file, the key and the fix.
"""

import contextlib
import glob
import json
import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator

from persllm.annotate.config import AnnotateConfig
from persllm.curate.config import CurateConfig
from persllm.errors import UserError
from persllm.evaluate.config import EvalConfig
from persllm.interact.config import ConverseConfig, ServeConfig
from persllm.labels import default_label, reserved_labels
from persllm.layout import RunLayout
from persllm.llm.config import LLMConfig
from persllm.pairs.config import PairsConfig
from persllm.schema import Section
from persllm.train.config import DPOConfig, SFTConfig

M = TypeVar("M", bound="Section")

TRAITS = ("O", "C", "E", "A", "N")


# --------------------------------------------------------------------------- persona file


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


# --------------------------------------------------------------------------- project file


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


@dataclass
class Project:
    """A loaded project: its validated config, its personas and where things live."""

    config: ProjectConfig
    config_path: Path
    personas: dict[str, PersonaConfig]
    persona_paths: dict[str, Path] = field(default_factory=dict)

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
        if persona_id not in self.personas:
            known = ", ".join(self.personas)
            raise UserError(f"{self.config_path}: no persona {persona_id!r}; use one of: {known}")
        return self.personas[persona_id]

    def stage_files(self, persona_id: str, stage_id: str, kind: str) -> list[Path]:
        """The corpus files of one stage's ``kind`` ('knowledge', 'style' or 'dialogue'), sorted."""
        persona = self.persona(persona_id)
        stage = persona.stage(stage_id)
        base = self.persona_paths[persona_id].parent
        return expand_globs(getattr(stage, kind), base)

    def dated_dialogue_files(self, persona_id: str) -> list[Path]:
        """The persona's timestamped chats, spread over its stages by date, sorted."""
        return expand_globs(self.persona(persona_id).dialogue, self.persona_paths[persona_id].parent)

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


# --------------------------------------------------------------------------- loading


def load_project(
    path: str | Path, overrides: dict[str, Any] | None = None, preset: str | None = None
) -> Project:
    """Load and validate ``persllm.yaml`` and every persona it names.

    Precedence: defaults < the YAML < the named ``preset`` from its ``presets:`` block < ``overrides``.
    """
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "persllm.yaml"
    raw = read_yaml(config_path)
    if preset is not None:
        presets = raw.get("presets") or {}
        if not isinstance(presets, dict) or not isinstance(presets.get(preset), dict):
            known = ", ".join(presets) if isinstance(presets, dict) and presets else "none defined"
            raise UserError(
                f"{config_path}: presets: no preset {preset!r} (known: {known}); add it or fix the name"
            )
        overrides = {**presets[preset], **(overrides or {})}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(raw, key, value)
    config = validate(ProjectConfig, raw, config_path)
    config_path = config_path.resolve()
    resolve_model_paths(config, config_path)

    personas: dict[str, PersonaConfig] = {}
    persona_paths: dict[str, Path] = {}
    for index, pattern in enumerate(config.personas):
        matches = expand_globs([pattern], config_path.parent)
        if not matches:
            raise UserError(
                f"{config_path}: personas[{index}]: no file matches {pattern!r}; "
                "fix the path (relative to this file) or create the persona file"
            )
        for persona_path in matches:
            persona = validate(PersonaConfig, read_yaml(persona_path), persona_path)
            if persona.id in personas:
                raise UserError(
                    f"{persona_path}: id: persona id {persona.id!r} is also used by "
                    f"{persona_paths[persona.id]}; give each persona its own id"
                )
            check_stage_files(persona, persona_path)
            if config.stage_labels.kind == "reserved":
                use_reserved_labels(persona, persona_path, config.base_model.model)
            personas[persona.id] = persona
            persona_paths[persona.id] = persona_path
    return Project(config=config, config_path=config_path, personas=personas, persona_paths=persona_paths)


def model_blocks(config: ProjectConfig) -> list[tuple[str, LLMConfig]]:
    """Every model block of the project with its dotted name: annotator, base_model, judges, agents."""
    blocks = [("annotator", config.annotator), ("base_model", config.base_model)]
    blocks += [
        (f"eval.{name}", llm) for name in ("judge", "second_judge") if (llm := getattr(config.eval, name))
    ]
    blocks += [(f"eval.extra_systems.{name}", llm) for name, llm in config.eval.extra_systems.items()]
    if config.converse.judge is not None:
        blocks.append(("converse.judge", config.converse.judge))
    blocks += [(f"converse.agents.{n}.llm", a.llm) for n, a in config.converse.agents.items() if a.llm]
    return blocks


def resolve_model_paths(config: ProjectConfig, config_path: Path) -> None:
    """Relative ``model`` and ``adapter`` paths resolve against the config file's folder, as corpus globs
    do (whatever the current directory). Hub ids and served model names are left as they are; whether a
    path exists is checked by the commands that will load it (``persllm.checks``)."""
    for _, llm in model_blocks(config):
        for key in ("model", "adapter"):
            value = getattr(llm, key)
            if not value or value.startswith("bundled:") or (llm.backend == "openai" and key == "model"):
                continue
            path = Path(value).expanduser()
            if not path.is_absolute() and (looks_like_path(value) or (config_path.parent / path).exists()):
                setattr(llm, key, str((config_path.parent / path).resolve()))


def looks_like_path(value: str) -> bool:
    """A model name written as a file path (``./x``, ``../x``, ``/x``, ``~/x``, ``x.gguf``), not a hub id."""
    return value.startswith((".", "/", "~")) or value.endswith(".gguf")


def use_reserved_labels(persona: PersonaConfig, persona_path: Path, model: str) -> None:
    """Give each stage without its own label one of the base model's reserved tokens."""
    given = [stage.label if stage._label_given else None for stage in persona.stages]
    labels = reserved_labels(model, given, f"{persona_path}: stages")
    for stage, label in zip(persona.stages, labels, strict=True):
        stage.label = label


def check_stage_files(persona: PersonaConfig, persona_path: Path) -> None:
    """Every glob must be well formed and match something; every stage must have material."""
    for g_index, pattern in enumerate(persona.dialogue):
        check_glob(pattern, f"{persona_path}: dialogue[{g_index}]", persona_path)
    if persona.dialogue and not any(s.since or s.until for s in persona.stages):
        raise UserError(
            f"{persona_path}: dialogue: dated chats need stages with `since` / `until` dates; add them "
            "(YYYY-MM-DD), or list the files under a stage's `dialogue` instead"
        )
    for s_index, stage in enumerate(persona.stages):
        for kind in ("knowledge", "style", "dialogue"):
            for g_index, pattern in enumerate(getattr(stage, kind)):
                check_glob(pattern, f"{persona_path}: stages[{s_index}].{kind}[{g_index}]", persona_path)
        dated = persona.dialogue and (stage.since or stage.until)
        if not stage.knowledge and not stage.style and not stage.dialogue and not dated:
            raise UserError(
                f"{persona_path}: stages[{s_index}] ({stage.id}): no knowledge, style or dialogue files; "
                "add at least one glob"
            )


def check_glob(pattern: str, where: str, persona_path: Path) -> None:
    if pattern.count("[") != pattern.count("]") or "***" in pattern:
        raise UserError(f"{where}: {pattern!r} is not a valid glob; check brackets and stars")
    if not expand_globs([pattern], persona_path.parent):
        raise UserError(
            f"{where}: {pattern!r} matches no file; fix the pattern (relative to {persona_path.name})"
        )


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(
            f"{path}: file not found; check the path (or create a project with `persllm init DIR`)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{where}: {problem}; fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level; got {type(data).__name__}")
    return data


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; string values are parsed as YAML scalars (``3`` -> 3)."""
    if isinstance(value, str):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value) if value else value
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_set_options(options: list[str] | None) -> dict[str, Any]:
    """``--set key.path=value`` options as a dict; a malformed one is a user error."""
    result: dict[str, Any] = {}
    for option in options or []:
        if "=" not in option:
            raise UserError(f"--set {option!r}: expected KEY=VALUE, e.g. --set annotate.counts.ordinary=8")
        key, value = option.split("=", 1)
        result[key.strip()] = value
    return result


def validate(model: type[M], raw: dict[str, Any], path: Path) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(explain_validation_error(exc, model, path)) from None


def explain_validation_error(exc: ValidationError, model: type[Section], path: Path) -> str:
    """The first validation error as one line: file, key, problem, fix."""
    error = exc.errors()[0]
    loc = error["loc"]
    key = ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in loc).replace(".[", "[")
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{path}: {key}: unknown key; remove it or fix the spelling{hint}"
    if kind == "missing":
        return f"{path}: {key}: required key is missing; add it"
    if kind == "too_short" and loc and loc[-1] == "stages":
        return f"{path}: stages: a persona needs at least one stage; add one with id, time and globs"
    if kind == "too_short":
        return f"{path}: {key}: must not be empty; add at least one entry"
    where = f"{path}: {key}" if key else str(path)
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and "; " in message:  # our own validators already say what to fix
        return f"{where}: {message}"
    given = error.get("input")
    shown = json.dumps(given, default=str)[:60] if not isinstance(given, dict) else "a mapping"
    return f"{where}: {message} (got {shown}); fix the value"


def _allowed_keys(model: type[Section], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, Section)), None)
        if current is None:
            return []
    fields = getattr(current, "model_fields", {})
    return sorted(fields)
