"""The models a project offers and one shared base model that serves them all.

A model id is ``persona:stage:variant`` (``elsie:keeper:dpo``), ``persona:stage`` or ``base``. Variants:
``sft`` and ``dpo`` (trained folders under ``models/<persona>/``), ``prompt`` (the base model told who it
is, no adapter) and, for chat's ``--model`` only (``chat_ref``, never a served id), any adapter folder.
Every persona adapter is loaded once into the same base model and selected per call, so serving ten
personas costs one model's memory: PEFT adapters on the transformers base, GGUF LoRA files (exported on
first use) on one llama.cpp engine. A persona that cannot be an adapter of the base (trained with new
stage tokens, or full weights) runs on a model of its own.
"""

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persllm.config import Project
from persllm.config.llm import LLMConfig
from persllm.errors import UserError
from persllm.hashing import stable_hash
from persllm.llm import make_backend
from persllm.llm.base import Completion, Message
from persllm.llm.transformers_backend import TransformersBackend
from persllm.prompting import SystemStyle
from persllm.train.common import system_style
from persllm.train.gguf_files import generation_adapter, generation_base

BASE = "base"
PROMPT = "prompt"
TRAINED = ("sft", "dpo")
LOCAL = ("transformers", "llamacpp")  # backends that run trained folders in this process
ANALYSIS_SUFFIX = "+analysis"


class UnknownModel(UserError):
    """A model id that names no persona, stage or trained variant of the project."""


@dataclass(frozen=True)
class ModelRef:
    """What a model id points at. ``path`` is the trained folder (adapter or full weights)."""

    id: str
    persona: str | None = None
    stage: str | None = None
    variant: str = BASE
    path: Path | None = None
    show_analysis: bool = False

    @property
    def system_style(self) -> SystemStyle:
        """The system prompt style the model was trained with (``full`` for the base model)."""
        return system_style(self.path) if self.path is not None else "full"


def trained_dir(project: Project, persona: str, variant: str) -> Path | None:
    """``models/<persona>/<variant>`` when it holds an adapter or full weights, else None."""
    folder = project.layout.model(persona, variant)
    return folder if is_model_folder(folder) else None


def is_model_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists() or (folder / "config.json").exists()


def list_model_ids(project: Project) -> list[str]:
    """``base``, then ``persona:stage:variant`` for every stage and every variant that exists."""
    ids = [BASE]
    for pid, persona in project.personas.items():
        variants = [PROMPT] + [v for v in TRAINED if _servable(project, pid, v)]
        ids += [f"{pid}:{stage.id}:{variant}" for stage in persona.stages for variant in variants]
    return ids


def resolve_model_id(project: Project, model_id: str) -> ModelRef:
    """The model behind ``model_id``; a ``+analysis`` suffix asks for the analysis too.

    ``persona:stage`` picks the best trained variant (dpo, then sft, then prompt). The id is matched
    against the project's persona and stage ids and the known variants before any folder is looked at,
    so nothing from the id ever becomes part of a path.
    """
    show = model_id.endswith(ANALYSIS_SUFFIX)
    name = model_id.removesuffix(ANALYSIS_SUFFIX)
    if name == BASE:
        return ModelRef(id=name, show_analysis=show)
    parts = name.split(":")
    persona = project.personas.get(parts[0])
    stage_ids = [s.id for s in persona.stages] if persona else []
    known_variant = len(parts) == 2 or (len(parts) == 3 and parts[2] in (PROMPT, *TRAINED))
    if persona is None or not known_variant or parts[1] not in stage_ids:
        raise UnknownModel(f"model {model_id!r} does not exist; GET /v1/models lists the model ids")
    variant = parts[2] if len(parts) == 3 else best_variant(project, persona.id)
    full = f"{persona.id}:{parts[1]}:{variant}"
    return ModelRef(full, persona.id, parts[1], *_variant(project, persona.id, variant, model_id), show)


def best_variant(project: Project, persona: str) -> str:
    return next((v for v in ("dpo", "sft") if _servable(project, persona, v)), PROMPT)


def _servable(project: Project, persona: str, variant: str) -> bool:
    """A trained variant exists and the base model runs here (not behind an endpoint)."""
    local = project.config.base_model.backend in LOCAL
    return local and trained_dir(project, persona, variant) is not None


def _variant(project: Project, persona: str, variant: str, model_id: str) -> tuple[str, Path | None]:
    if variant == PROMPT:
        return PROMPT, None
    path = trained_dir(project, persona, variant) if _servable(project, persona, variant) else None
    if path is None:
        raise UnknownModel(
            f"model {model_id!r} does not exist (no trained {variant!r} model for {persona!r}); "
            "GET /v1/models lists the model ids"
        )
    return variant, path


def chat_ref(project: Project, persona: str, stage: str, model: str) -> ModelRef:
    """The model of ``persllm chat``: ``model`` is sft, dpo, prompt or a folder."""
    project.persona(persona).stage(stage)
    if model in (PROMPT, *TRAINED):
        try:
            return ModelRef(
                f"{persona}:{stage}:{model}", persona, stage, *_variant(project, persona, model, model)
            )
        except UnknownModel:
            where = project.layout.model(persona, model)
            raise UserError(
                f"--model {model}: {where} holds no trained model; train it or use --model prompt"
            ) from None
    folder = Path(model).expanduser()
    if not is_model_folder(folder):
        raise UserError(f"--model {model}: not sft, dpo, prompt or a folder with an adapter or model; fix it")
    return ModelRef(f"{persona}:{stage}:{folder.name}", persona, stage, "path", folder.resolve())


@dataclass
class Speaker:
    """A backend bound to one model: the adapter it selects, the stage label it was trained with."""

    backend: Any
    label: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    own_tokenizer: Any = None  # an adapter's tokenizer (with its stage tokens), else the backend's
    system_style: SystemStyle = "full"  # the system prompt style the model was trained with

    @property
    def tokenizer(self) -> Any | None:
        return self.own_tokenizer or getattr(self.backend, "tokenizer", None)

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion:
        return await self.backend.generate(messages, {**params, **self.fixed})

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]:
        """Text pieces as they are generated (one piece for backends that cannot stream)."""
        if hasattr(self.backend, "stream"):
            async for piece in self.backend.stream(messages, {**params, **self.fixed}):
                yield piece
        else:
            yield (await self.generate(messages, params)).text

    def count_tokens(self, messages: list[Message]) -> int:
        """Prompt tokens of ``messages`` with the chat template (about 4 characters a token without one)."""
        tokenizer = self.tokenizer
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            return sum(len(m["content"]) // 4 + 4 for m in messages)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class ModelPool:
    """One base model with every persona adapter loaded into it, created on first use.

    Args:
        project: the project whose ``base_model`` and trained folders are served.
    """

    def __init__(self, project: Project) -> None:
        self.project = project
        self.cfg = project.config.base_model
        self._base: Any = None
        self._adapters: dict[Path, str] = {}
        self._full: dict[Path, Any] = {}
        self._tokenizers: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def base(self) -> Any:
        with self._lock:
            if self._base is None:
                self._base = _make_base(self._generation_cfg(None, None))
            return self._base

    def speakers(self, refs: list[ModelRef]) -> list[Speaker]:
        """The speakers of ``refs``, every model loaded.

        All adapters are registered before anything loads: a llama.cpp engine loads its adapters when
        it starts.
        """
        speakers = [self._speaker(ref) for ref in refs]
        for speaker in speakers:
            load = getattr(speaker.backend, "load", None)
            if load is not None:
                load()
        return speakers

    def speaker(self, ref: ModelRef) -> Speaker:
        """The backend and per-call settings that make the base model speak as ``ref``."""
        return self.speakers([ref])[0]

    def _speaker(self, ref: ModelRef) -> Speaker:
        if ref.path is None:
            return Speaker(self.base(), fixed={"adapter": BASE} if self.cfg.backend in LOCAL else {})
        persona = self.project.persona(ref.persona) if ref.persona else None
        label = persona.stage(ref.stage).label if persona is not None and ref.stage else None
        style = ref.system_style
        tokenizer = self._tokenizer(ref.path)
        adapter = self._adapter_file(ref)
        if adapter is None:
            backend = self._full_model(ref)
            return Speaker(backend, label=label, own_tokenizer=tokenizer, system_style=style)
        fixed = {"adapter": self.adapter(ref, adapter)}
        return Speaker(self.base(), label=label, fixed=fixed, own_tokenizer=tokenizer, system_style=style)

    def _adapter_file(self, ref: ModelRef) -> Path | None:
        """What the shared base switches on for ``ref``: its PEFT folder (transformers) or its GGUF LoRA
        file (llamacpp); None when ``ref`` needs a model of its own."""
        assert ref.path is not None
        if not (ref.path / "adapter_config.json").exists():
            return None
        if self.cfg.backend != "llamacpp":
            return ref.path

        assert ref.persona is not None
        made, is_adapter = generation_adapter(self.project.workspace, self.cfg, ref.persona, ref.path)
        return made if is_adapter else None

    def adapter(self, ref: ModelRef, source: Path | None = None) -> str:
        """The adapter name of ``ref`` in the base model, loading the adapter the first time."""
        assert ref.path is not None
        if self.cfg.backend not in LOCAL:
            raise UserError(
                "base_model.backend: trained adapters are served by the 'transformers' or 'llamacpp' "
                "backend; set one, or serve them with vLLM --enable-lora and point an 'openai' agent at it"
            )
        base = self.base()
        with self._lock:
            if ref.path not in self._adapters:
                stem = f"{ref.persona}_{ref.variant}" if ref.variant in TRAINED else "path"
                name = f"{stem}_{stable_hash(str(ref.path), 8)}"
                base.add_adapter(name, str(source or ref.path))
                self._adapters[ref.path] = name
            return self._adapters[ref.path]

    def _tokenizer(self, path: Path) -> Any:
        if not (path / "tokenizer_config.json").exists():
            return None
        with self._lock:
            if path not in self._tokenizers:
                from transformers import AutoTokenizer

                self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
            return self._tokenizers[path]

    def _full_model(self, ref: ModelRef) -> Any:
        """A backend of its own for a trained folder: full weights, or (llamacpp) its merged GGUF."""
        assert ref.path is not None
        with self._lock:
            if ref.path not in self._full:
                self._full[ref.path] = _make_base(self._generation_cfg(ref.persona, ref.path))
            return self._full[ref.path]

    def _generation_cfg(self, persona: str | None, folder: Path | None) -> LLMConfig:
        """The base model config pointed at what generates: the base, a trained folder, or a GGUF file."""
        if self.cfg.backend == "llamacpp":
            if folder is None or persona is None:
                return self.cfg.model_copy(
                    update={"model": str(generation_base(self.project.workspace, self.cfg))}
                )
            return self.cfg.model_copy(
                update={
                    "model": str(generation_adapter(self.project.workspace, self.cfg, persona, folder)[0])
                }
            )
        if folder is None:
            return self.cfg
        return self.cfg.model_copy(update={"model": str(folder), "adapter": None})

    async def aclose(self) -> None:
        for backend in [self._base, *self._full.values()]:
            if backend is not None:
                await backend.aclose()


def _make_base(cfg: LLMConfig) -> Any:
    if cfg.backend == "transformers":
        return TransformersBackend(cfg)

    return make_backend(cfg)
