"""The held-out items, the systems compared on them, how each system is prompted, and generation.

Systems:
- ``prompt``: the base model with the persona's system prompt (profile + time phrase), no label token.
- ``rag``: the same plus the context the annotator retrieved for the item (the annotation record's, or
  re-retrieved from the index when the record has none).
- ``sft`` / ``sft+dpo``: the base model with ``models/<persona>/sft`` or ``/dpo``, prompted exactly like
  the training data (the system prompt style it was trained with, label token before the first user
  turn).
- any name in ``eval.extra_systems``: that model, prompted like ``prompt``.

Each item is its first exchange: the system prompt and first user turn, and the reference reply. Items
come in two sets: ``golden`` (curate's held-out annotator dialogues, ``sft_test.jsonl``; the reference is
the annotator's golden reply) and ``heldout`` (the person's held-out own words, with the question the
annotator back-wrote for each; the reference is the real passage, which no training file contains).
"""

import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from persllm.config import Workspace
from persllm.config.llm import LLMConfig
from persllm.config.stages import EvalSettings
from persllm.errors import UserError
from persllm.evaluate.judge import render
from persllm.index.retrieve import Retriever, without_sources
from persllm.jsonl import read_jsonl
from persllm.llm import make_backend
from persllm.llm.base import Completion, Message
from persllm.prompting import SystemStyle, split_inline, system_prompt
from persllm.train.common import system_style
from persllm.train.gguf_files import generation_adapter, generation_base

if TYPE_CHECKING:
    from persllm.config import PersonaConfig, StageConfig

BUILTIN = ("prompt", "rag", "sft", "sft+dpo")
ADAPTER_OF = {"sft": "sft", "sft+dpo": "dpo"}
BATCH = 64  # conversations handed to a local backend at once; it splits them into its own batches


@dataclass
class Item:
    """One held-out exchange."""

    id: str
    persona: str
    stage: str
    kind: str
    label: str | None
    system: str
    question: str
    reference: str
    context: dict[str, str] | None = None
    set: str = "golden"
    brief: str = ""  # the brief system prompt, for models trained with curate.system_prompt: brief
    history: list[Message] = field(default_factory=list)  # real turns before the question (dialogue)
    source: str = "passage"  # a held-out item's reference: a passage, or a real exchange's reply


def stage_prompts(persona: "PersonaConfig", stage: "StageConfig") -> tuple[str, str]:
    """An ``Item``'s ``system`` (full: what the baselines get) and ``brief`` prompts for a persona's stage."""
    return system_prompt(persona, stage, "full"), system_prompt(persona, stage, "brief")


@dataclass
class System:
    """A model and the way it is prompted; ``adapters`` maps persona -> adapter folder (trained systems)."""

    name: str
    llm: LLMConfig
    mode: Literal["prompt", "rag", "trained"]
    adapters: dict[str, Path] = field(default_factory=dict)
    styles: dict[str, SystemStyle] = field(default_factory=dict)  # persona -> how its model was trained


@dataclass
class Request:
    """One generation: which system, for which persona and stage and item, with which messages and sample."""

    system: System
    persona: str
    stage: str
    messages: list[Message]
    sample: int = 0
    item: str = ""


# --------------------------------------------------------------------------- items


def load_items(settings: EvalSettings, workspace: Workspace, max_items: int | None) -> list[Item]:
    """The held-out items of every persona, at most ``max_items`` per persona x stage, in file order."""
    items: list[Item] = []
    for persona_id in workspace.personas:
        path = workspace.layout.sft_test(persona_id)
        contexts = annotation_contexts(workspace, persona_id)
        taken: dict[str, int] = defaultdict(int)
        for number, row in enumerate(read_jsonl(path), start=1):
            item = item_of(row, f"{path}:{number}")
            if max_items is not None and taken[item.stage] >= max_items:
                continue
            taken[item.stage] += 1
            item.context = contexts.get(item.id)
            if item.persona in workspace.personas:
                persona = workspace.personas[item.persona]
                item.system, item.brief = stage_prompts(persona, persona.stage(item.stage))
            items.append(item)
    return items


def load_heldout_items(workspace: Workspace, max_items: int | None) -> list[Item]:
    """The held-out own-words items: one per held-out passage with a back-written question."""
    items: list[Item] = []
    for persona_id, persona in workspace.personas.items():
        path = workspace.layout.heldout_questions(persona_id)
        taken: dict[str, int] = defaultdict(int)
        for number, record in enumerate(read_jsonl(path), start=1):
            turns, stage_id = record.get("turns"), record.get("stage")
            if (
                not isinstance(turns, list)
                or len(turns) < 2
                or stage_id not in {s.id for s in persona.stages}
            ):
                raise UserError(f"{path}:{number}: not a held-out question record; re-run `persllm annotate`")
            if max_items is not None and taken[stage_id] >= max_items:
                continue
            taken[stage_id] += 1
            stage = persona.stage(stage_id)
            full, brief = stage_prompts(persona, stage)
            items.append(
                Item(
                    id=str(record["id"]),
                    persona=persona_id,
                    stage=stage_id,
                    kind=str(record.get("kind", "ordinary")),
                    label=stage.label,
                    system=full,
                    brief=brief,
                    question=turns[-2]["content"].strip(),
                    reference=turns[-1]["content"].strip(),
                    set="heldout",
                    history=[{"role": t["role"], "content": t["content"]} for t in turns[:-2]],
                    source="exchange" if (record.get("reply") or {}).get("question") == "real" else "passage",
                )
            )
    return items


def item_of(row: dict[str, Any], where: str) -> Item:
    """An ``Item`` from one ``sft_test.jsonl`` row; a malformed row is a user error naming it."""
    messages, meta = row.get("messages"), row.get("meta") or {}
    roles = [m.get("role") for m in messages] if isinstance(messages, list) else []
    if roles[:3] != ["system", "user", "assistant"] or not all(k in meta for k in ("persona", "stage")):
        raise UserError(
            f"{where}: expected messages [system, user, assistant, ...] and meta.persona/stage; re-run curate"
        )
    assert isinstance(messages, list)
    label = meta.get("label")
    question = messages[1]["content"].strip()
    if label and question.startswith(label):
        question = question[len(label) :].strip()
    return Item(
        id=str(meta.get("id") or where),
        persona=meta["persona"],
        stage=meta["stage"],
        kind=meta.get("kind", "ordinary"),
        label=label,
        system=messages[0]["content"],
        question=question,
        reference=split_inline(messages[2]["content"])[1],
    )


def annotation_contexts(workspace: Workspace, persona_id: str) -> dict[str, dict[str, str]]:
    """The retrieved context of each annotation record, by record id."""
    path = workspace.layout.dialogues(persona_id)
    contexts: dict[str, dict[str, str]] = {}
    for record in read_jsonl(path):
        context = record.get("context")
        if isinstance(context, dict) and "id" in record:
            contexts[record["id"]] = {k: str(context.get(k) or "") for k in ("knowledge", "style")}
    return contexts


# --------------------------------------------------------------------------- systems


def plan_systems(
    settings: EvalSettings, workspace: Workspace, names: list[str]
) -> tuple[list[System], dict[str, str]]:
    """The systems to run and, for each one left out, why (missing models never stop the evaluation)."""
    cfg = settings
    base = with_dtype(cfg.base_model, cfg.eval.dtype)
    planned: list[System] = []
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name in ("prompt", "rag"):
            planned.append(System(name, base, "prompt" if name == "prompt" else "rag"))
        elif name in ADAPTER_OF:
            folder = ADAPTER_OF[name]
            adapters = {p: workspace.layout.model(p, folder) for p in workspace.personas}
            missing = [p for p, path in adapters.items() if not (path / "adapter_config.json").exists()]
            if missing:
                where = ", ".join(str(adapters[p]) for p in missing)
                skipped[name] = f"no trained model at {where}; run `persllm train` first"
                continue
            styles = {p: system_style(path) for p, path in adapters.items()}
            planned.append(System(name, base, "trained", adapters, styles))
        elif name in cfg.eval.extra_systems:
            planned.append(System(name, with_dtype(cfg.eval.extra_systems[name], cfg.eval.dtype), "prompt"))
        else:
            known = ", ".join([*BUILTIN, *cfg.eval.extra_systems])
            raise UserError(f"eval.systems: unknown system {name!r}; use one of: {known}")
    return planned, skipped


def with_dtype(llm: LLMConfig, dtype: str) -> LLMConfig:
    """``llm`` with the evaluation's weights dtype, where one is set."""
    return llm if dtype == "auto" else llm.model_copy(update={"dtype": dtype})


def generation_target(
    settings: EvalSettings, workspace: Workspace, system: System, persona: str
) -> tuple[LLMConfig, str | None]:
    """(the model that answers for ``system`` and ``persona``, the adapter it switches on, if any).

    A trained persona is its adapter on the shared base model. With ``base_model.backend: llamacpp`` the
    base is a GGUF file and the adapter a GGUF LoRA file (exported on first use); a persona that cannot be
    an adapter of the base (trained with new stage tokens) is a merged GGUF model of its own.
    """
    trained = system.adapters.get(persona) if system.mode == "trained" else None
    if system.llm.backend != "llamacpp" or system.name not in BUILTIN:
        return system.llm, str(trained) if trained is not None else None

    if trained is None:
        return system.llm.model_copy(
            update={"model": str(generation_base(workspace, settings.base_model))}
        ), None
    made, is_adapter = generation_adapter(workspace, settings.base_model, persona, trained)
    if not is_adapter:
        return system.llm.model_copy(update={"model": str(made)}), None
    return system.llm.model_copy(update={"model": str(generation_base(workspace, settings.base_model))}), str(
        made
    )


def adapter_name(persona: str, system: System) -> str:
    """The adapter's name on a shared backend (a served LoRA name for the openai backend)."""
    return f"{persona}-{ADAPTER_OF[system.name]}"


def messages_for(
    system: System, item: Item, context: Callable[[Item], dict[str, str] | None] | None = None
) -> list[Message]:
    """The conversation a system sees for an item: trained systems get the label token, rag the context."""
    turns: list[Message] = [*item.history, {"role": "user", "content": item.question}]
    if system.mode == "trained":
        if item.label:  # the stage label opens the first user turn, as in training
            turns[0] = {"role": "user", "content": f"{item.label} {turns[0]['content']}"}
        trained = item.brief if system.styles.get(item.persona) == "brief" and item.brief else item.system
        return [{"role": "system", "content": trained}, *turns]
    prompt = item.system
    if system.mode == "rag":
        found = item.context if item.context is not None else (context(item) if context else None)
        if found is not None:
            prompt = rag_system_prompt(item.system, found.get("knowledge", ""), found.get("style", ""))
    return [{"role": "system", "content": prompt}, *turns]


def rag_system_prompt(system: str, knowledge: str, style: str) -> str:
    return render(
        "rag_system",
        system=system,
        knowledge=without_sources(knowledge) or "(nothing retrieved)",
        style=without_sources(style) or "(nothing retrieved)",
    )


def retrieval_context(
    settings: EvalSettings, workspace: Workspace
) -> Callable[[Item], dict[str, str] | None]:
    """Re-retrieval for items whose annotation record is gone: the index's context for the question."""
    retriever: Any = None

    def fetch(item: Item) -> dict[str, str] | None:
        nonlocal retriever

        retriever = retriever or Retriever(workspace, settings.embedder, settings.retrieval)
        found = retriever.retrieve(item.persona, item.stage, item.question)
        return {"knowledge": found.knowledge_text(), "style": found.style_text()}

    return fetch


# --------------------------------------------------------------------------- generation


def generate(
    settings: EvalSettings,
    workspace: Workspace,
    requests: list[Request],
    params: dict[str, Any],
    cache: Any,
    backends: dict[str, Any] | None = None,
) -> list[Completion]:
    """Answers to ``requests`` in order: one backend per model, adapters switched by name, local models
    in batches, endpoints concurrently; every call goes through the cache (``n_sample`` separates samples).

    Pass a ``backends`` dict to keep models loaded for later calls (then close them with ``close``);
    without one, the backends are made here and closed at the end.
    """
    owned = backends is None
    pool: dict[str, Any] = {} if backends is None else backends

    async def answer_all() -> list[Completion]:
        try:
            return await _generate(settings, workspace, requests, params, cache, pool)
        finally:
            if owned:
                await _close(pool)

    return asyncio.run(answer_all())


def close(backends: dict[str, Any]) -> None:
    """Close backends kept by ``generate``."""
    asyncio.run(_close(backends))


async def _close(backends: dict[str, Any]) -> None:
    for backend in backends.values():
        await backend.aclose()
    backends.clear()


async def _generate(
    settings: EvalSettings,
    workspace: Workspace,
    requests: list[Request],
    params: dict[str, Any],
    cache: Any,
    backends: dict[str, Any],
) -> list[Completion]:

    # Every adapter is registered before the first generation (a llama.cpp engine loads them at start).
    groups: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    targets: dict[tuple[str, str], tuple[LLMConfig, str | None]] = {}
    for index, request in enumerate(requests):
        where = (request.system.name, request.persona)
        if where not in targets:
            targets[where] = generation_target(settings, workspace, request.system, request.persona)
        llm, adapter_path = targets[where]
        model_key = llm.model_dump_json(exclude={"adapter", "params"})
        if model_key not in backends:
            backends[model_key] = make_backend(llm, cache)
        adapter = ""
        if adapter_path is not None and llm.backend in ("transformers", "llamacpp"):
            adapter = adapter_name(request.persona, request.system)
            backend = backends[model_key]
            if adapter not in backend.adapters:
                backend.add_adapter(adapter, adapter_path)
        elif request.system.mode == "trained" and llm.backend == "openai":
            adapter = adapter_name(request.persona, request.system)
        groups[(model_key, adapter, request.sample)].append(index)

    results: list[Completion | None] = [None] * len(requests)
    progress = Progress("eval", "answers", len(requests))
    for (model_key, adapter, sample), indices in groups.items():
        backend = backends[model_key]
        call = {**params, "n_sample": sample, "adapter": adapter or None}
        if "seed" not in params:
            call["seed"] = settings.seed + sample
        conversations = [requests[i].messages for i in indices]
        answers: list[Completion] = []
        if hasattr(getattr(backend, "inner", backend), "generate_batch"):
            for start in range(0, len(conversations), BATCH):
                answers += backend.generate_batch(conversations[start : start + BATCH], call)
                progress.advance(len(conversations[start : start + BATCH]))
        else:
            answers = list(await asyncio.gather(*(backend.generate(m, call) for m in conversations)))
            progress.advance(len(conversations))
        for i, answer in zip(indices, answers, strict=True):
            results[i] = answer
    return [r for r in results if r is not None]


class Progress:
    """One stderr line per step: done of total, seconds so far, and about how many are left."""

    def __init__(self, stage: str, unit: str, total: int) -> None:
        self.stage, self.unit, self.total = stage, unit, total
        self.done, self.started = 0, time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        print(
            f"{self.stage}: {self.done}/{self.total} {self.unit}, {elapsed:.0f} s, about {left:.0f} s left",
            file=sys.stderr,
            flush=True,
        )
