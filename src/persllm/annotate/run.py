"""``persllm annotate``: plan the dialogues, skip finished ones, annotate the rest concurrently, append each.

Records go to ``annotations/<persona>.jsonl`` one durable line at a time, keyed by stable item ids:
interrupting a run (Ctrl-C, kill -9) loses at most the dialogues in flight, and a re-run writes
exactly the missing ones. Every call goes through ``cache.sqlite``, so a repeated run costs no calls.

Items that end unwritten go to ``failures/annotate.jsonl`` with their reason. One whose every attempt was
malformed is given up (a re-run gets the same cached outputs); one that hit model errors (a server down,
HTTP 5xx) is missing, and the stage is ``partial`` until a later run writes it.
"""

import asyncio
import fcntl
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persllm.annotate import prompts
from persllm.annotate.engine import Annotator, Stats, attempt_modes
from persllm.annotate.plan import KINDS, Item, item_id, plan_heldout, plan_items
from persllm.config import Workspace
from persllm.config.stages import AnnotateSettings
from persllm.errors import UserError
from persllm.hashing import stable_hash
from persllm.index.retrieve import Retriever, load_heldout
from persllm.jsonl import JsonlAppender, read_jsonl, write_jsonl
from persllm.layout import RunLayout
from persllm.llm import make_backend
from persllm.llm.base import LLMError
from persllm.llm.cache import open_cache
from persllm.manifest import record_stage
from persllm.persona.corpus import reply_cut

# Abort (re-raising the error) when this many dialogues in a row failed on model errors: the
# server is down or misconfigured, and every further item would only wait through its retries.
MAX_CONSECUTIVE_ERRORS = 8
DRY_RUN_USER = "[the generated user message goes here]"


def run(
    settings: AnnotateSettings,
    workspace: Workspace,
    personas: list[str] | None = None,
    stages: list[str] | None = None,
    limit: int | None = None,
    concurrency: int | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Annotate the planned dialogues of ``personas`` x ``stages`` (default: all) that are not done yet.

    Args:
        limit: annotate only the first ``limit`` items of the (interleaved) plan.
        concurrency: dialogues in flight at once (default ``annotator.concurrency``).
        dry_run: build the prompts of the first item with real retrieved context; call no model.

    Returns:
        Counts: ``planned``, ``done`` (written now), ``skipped`` (written before), ``failed`` per kind
        (malformed after every attempt), ``errors`` (model errors), calls, cached calls, tokens, seconds.
    """
    started = time.perf_counter()
    cfg = settings
    persona_ids = list(personas or workspace.personas)
    selected = select_stages(workspace, persona_ids, stages)
    retriever = Retriever(workspace, settings.embedder, settings.retrieval)

    # Plan every item deterministically (training dialogues, then the held-out passages' questions);
    # a limit takes the first ones.
    plan = plan_items(settings, lambda p, s: retriever.chunks(p, s), persona_ids, selected)
    if cfg.annotate.heldout_questions:
        plan += plan_heldout(settings, lambda p, s: load_heldout(workspace, p, s), persona_ids, selected)
    items = plan[:limit] if limit is not None else plan
    if dry_run:
        return dry_run_prompts(settings, workspace, retriever, items)

    # Real exchanges (dialogue material) need no annotator: each is written as it is.
    layout = workspace.layout
    written = {pid: existing_ids(layout, pid) for pid in persona_ids}
    real = write_real_dialogues(layout, persona_ids, selected, written, limit)

    # Skip what earlier runs wrote.
    todo = [item for item in items if item.id not in written[item.persona]]
    size = concurrency or cfg.annotator.concurrency
    summary: dict[str, Any] = {
        "planned": len(items),
        "skipped": len(items) - len(todo),
        "sources": dict(Counter(item.source for item in items)),
        "real_dialogues": real,
    }
    tally = Tally(attempts=cfg.annotate.max_attempts)
    annotator = make_annotator(settings, workspace, retriever, size) if todo else None

    # Annotate concurrently, appending each record the moment it is complete.
    status = "interrupted"
    try:
        if annotator is not None:
            annotator.modes()  # an impossible output setting fails before any call
            with exclusive(layout.annotations):
                asyncio.run(annotate_all(annotator, todo, layout, size, tally, progress))
        status = "finished"
    finally:
        # Record the stage, whatever happened: what is still missing, and why, in the failures file.
        written = {pid: existing_ids(layout, pid) for pid in persona_ids}
        unwritten = [item for item in plan if item.id not in written[item.persona]]
        write_failures(layout, unwritten, tally)
        missing = [item for item in unwritten if item.id not in tally.given_up]
        if status == "finished":
            status = "partial" if missing else "done"
        summary.update(tally.counts(annotator), seconds=round(time.perf_counter() - started, 3))
        summary.update(missing=len(missing), given_up=len(unwritten) - len(missing))
        record_stage(
            workspace,
            "annotate",
            status=status,
            personas=persona_ids,
            **{
                key: summary[key]
                for key in (
                    "planned",
                    "done",
                    "skipped",
                    "failed",
                    "errors",
                    "missing",
                    "given_up",
                    "calls",
                    "seconds",
                )
            },
            records={pid: len(read_jsonl(layout.dialogues(pid))) for pid in persona_ids},
            heldout_records={pid: len(read_jsonl(layout.heldout_questions(pid))) for pid in persona_ids},
        )
    summary["status"] = status
    summary["items_per_second"] = round(summary["done"] / max(summary["seconds"], 1e-9), 3)
    return summary


@dataclass
class Tally:
    """Items written, and items that failed: malformed after every attempt (per kind) or a model error."""

    attempts: int = 1
    done: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    given_up: set[str] = field(default_factory=set)  # every attempt malformed: the same again next run
    reasons: dict[str, str] = field(default_factory=dict)  # item id -> why it is not written

    def counts(self, annotator: Annotator | None) -> dict[str, Any]:
        stats = annotator.stats if annotator is not None else Stats()
        return {
            "done": self.done,
            "failed": {kind: self.failed[kind] for kind in KINDS},
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else None,
            "calls": stats.calls,
            "cached_calls": stats.cached,
            "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens},
            "malformed": dict(stats.malformed),
            "follow_ups_dropped": stats.follow_ups_dropped,
        }


async def annotate_all(
    annotator: Annotator,
    items: list[Item],
    layout: RunLayout,
    concurrency: int,
    tally: Tally,
    progress: bool,
) -> None:
    """Run ``items``, ``concurrency`` at a time, appending each record as it is complete."""
    from tqdm.auto import tqdm

    slots = asyncio.Semaphore(concurrency)
    appenders = {path: JsonlAppender(path) for path in {record_path(layout, item) for item in items}}
    # One writer thread: each fsync'd append leaves the event loop free, and lines never interleave.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="annotate-writer")
    loop = asyncio.get_running_loop()
    in_a_row = 0
    bar = tqdm(total=len(items), unit="item", desc="annotate", disable=not progress, dynamic_ncols=True)

    async def one(item: Item) -> None:
        nonlocal in_a_row
        async with slots:
            try:
                record = await annotator.dialogue(item)
                in_a_row = 0
            except LLMError as exc:
                tally.errors.append(str(exc))
                tally.reasons[item.id] = f"model error: {exc}"
                in_a_row += 1
                if in_a_row >= MAX_CONSECUTIVE_ERRORS:
                    raise
                bar.update(1)
                return
        if record is not None:
            await loop.run_in_executor(writer, appenders[record_path(layout, item)].append, record)
            tally.done += 1
        else:
            tally.failed[item.kind] += 1
            tally.given_up.add(item.id)
            tally.reasons[item.id] = f"malformed after {tally.attempts} attempts"
        stats = annotator.stats
        failed, errors = sum(tally.failed.values()), len(tally.errors)
        bar.set_postfix(tokens=stats.tokens, cached=stats.cached, failed=failed, errors=errors, refresh=False)
        bar.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for item in items:
                group.create_task(one(item))
    except BaseExceptionGroup as failure:
        raise failure.exceptions[0] from None  # the error that stopped the run, not the group wrapper
    finally:
        bar.close()
        writer.shutdown(wait=True)  # a record being written is finished before its file closes
        for appender in appenders.values():
            appender.close()
        await annotator.backend.aclose()


def write_failures(layout: RunLayout, unwritten: list[Item], tally: Tally) -> None:
    """``failures/annotate.jsonl``: every planned item still unwritten, with its reason and attempts."""

    rows = [
        {
            "id": item.id,
            "persona": item.persona,
            "stage": item.stage,
            "kind": item.kind,
            "source": item.source,
            "seed": item.seed.ref,
            "reason": tally.reasons.get(item.id, "not attempted (the run stopped first)"),
            "attempts": tally.attempts if item.id in tally.reasons else 0,
            "given_up": item.id in tally.given_up,
        }
        for item in unwritten
    ]
    path = layout.failures("annotate")
    if rows or path.exists():
        write_jsonl(path, rows)


def make_annotator(
    settings: AnnotateSettings, workspace: Workspace, retriever: Retriever, concurrency: int
) -> Annotator:
    """The annotator over the project's call cache, allowing ``concurrency`` requests in flight."""

    llm_cfg = settings.annotator.model_copy(update={"concurrency": concurrency})
    backend = make_backend(llm_cfg, open_cache(workspace))
    return Annotator(workspace, settings.annotator, settings.annotate, backend, retriever)


def select_stages(
    workspace: Workspace, persona_ids: list[str], stages: list[str] | None
) -> dict[str, list[str]]:
    """persona -> stage ids to annotate; a named stage no selected persona has is a user error."""
    selected: dict[str, list[str]] = {}
    for pid in persona_ids:
        own = [stage.id for stage in workspace.persona(pid).stages]
        selected[pid] = [s for s in own if stages is None or s in stages]
    for stage_id in stages or []:
        if not any(stage_id in ids for ids in selected.values()):
            known = sorted({s.id for pid in persona_ids for s in workspace.persona(pid).stages})
            raise UserError(
                f"--stage {stage_id!r}: no selected persona has that stage; use one of: {', '.join(known)}"
            )
    return selected


def write_real_dialogues(
    layout: RunLayout,
    persona_ids: list[str],
    stages: dict[str, list[str]],
    written: dict[str, set[str]],
    limit: int | None,
) -> dict[str, int]:
    """Append a record for every real exchange not written yet (adding its id to ``written``); the counts
    written now (training, held-out) and present.

    A training exchange is a dialogue as it is; a held-out one is an evaluation item whose question is
    the real turn before the reply. With a ``limit`` (a trial run) none is written.
    """
    counts = {"dialogue": 0, "heldout": 0, "present": 0}
    if limit is not None:
        return counts
    for persona_id in persona_ids:
        for stage_id in stages[persona_id]:
            for source, path in (
                ("dialogue", layout.exchanges(persona_id, stage_id)),
                ("heldout", layout.heldout_exchanges(persona_id, stage_id)),
            ):
                records = [real_record(persona_id, stage_id, row, source) for row in read_jsonl(path)]
                counts["present"] += len(records)
                fresh = [r for r in records if r["id"] not in written[persona_id]]
                if not fresh:
                    continue
                target = (
                    layout.heldout_questions(persona_id)
                    if source == "heldout"
                    else layout.dialogues(persona_id)
                )
                with JsonlAppender(target) as appender:
                    appender.extend(fresh)
                written[persona_id].update(r["id"] for r in fresh)
                counts[source] += len(fresh)
    return counts


def real_record(persona: str, stage: str, exchange: dict[str, Any], source: str) -> dict[str, Any]:
    """The annotation record of one real exchange: its turns as they were, its reply the person's own."""
    turns = [
        {"role": "assistant", "analysis": "", "content": t["content"]}
        if t["role"] == "assistant"
        else dict(t)
        for t in exchange["turns"]
    ]
    ref = str(exchange["ref"])
    return {
        # The turns are part of the id: a window cut by a changed held-out split is a new record.
        "id": item_id(persona, stage, "dialogue", f"{ref}#{stable_hash(turns, length=12)}", 0, source),
        "persona": persona,
        "stage": stage,
        "kind": "ordinary",
        "seed": {"source": "dialogue", "ref": ref, "text": turns[-1]["content"]},
        "turns": turns,
        "reply": {"source": source, "ref": ref, "question": "real"},
        "context": {"knowledge": "", "style": ""},
        "annotator": None,
        "time": exchange.get("time"),
    }


def record_path(layout: RunLayout, item: Item) -> Path:
    """Where an item's record goes: the held-out passages' questions apart from the training dialogues."""
    if item.source == "heldout":
        return layout.heldout_questions(item.persona)
    return layout.dialogues(item.persona)


def existing_ids(layout: RunLayout, persona_id: str) -> set[str]:
    """Ids of the records a persona already has, training dialogues and held-out questions."""
    paths = (layout.dialogues(persona_id), layout.heldout_questions(persona_id))
    return {str(row.get("id")) for path in paths for row in read_jsonl(path)}


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold ``annotations/.lock``: two runs appending to the same files would write items twice."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{folder}: another `persllm annotate` is writing here; wait for it to finish or stop it"
            ) from None
        yield


def dry_run_prompts(
    settings: AnnotateSettings, workspace: Workspace, retriever: Retriever, items: list[Item]
) -> dict[str, Any]:
    """The exact prompts of the first item, with real retrieved context; no model is called."""
    if not items:
        raise UserError(
            f"{workspace.config_path}: annotate.counts: nothing to annotate; raise a count above 0"
        )
    item = items[0]
    cfg = settings
    persona = workspace.persona(item.persona)
    stage = persona.stage(item.stage)
    json_ok = cfg.annotator.backend in ("openai", "llamacpp") and cfg.annotator.structured_output != "off"
    mode = attempt_modes(cfg.annotate.output, 1, json_ok)[0]
    if item.source != "annotator":
        return dry_run_own_words(settings, workspace, item, len(items))
    turns = [{"role": "user", "content": DRY_RUN_USER}]
    context = retriever.retrieve(item.persona, item.stage, item.seed.text, item.seed)
    knowledge, style = context.knowledge_text(), context.style_text()
    messages: dict[str, list[dict[str, str]]] = {
        "user_input": prompts.build_user_input_messages(
            persona, stage, item.kind, item.seed.text, item.stance
        )
    }
    if mode == "two_step":
        messages["analysis"] = prompts.build_analysis_messages(persona, stage, turns, knowledge)
        notes = "[the generated analysis goes here]"
        messages["response"] = prompts.build_response_messages(persona, stage, turns, knowledge, style, notes)
    else:
        messages["reply"] = prompts.build_reply_messages(persona, stage, turns, knowledge, style, mode)
    return {
        "dry_run": True,
        "item": dry_run_item(item, stance=item.stance, follow_ups=item.follow_ups),
        "output": mode,
        "params": {
            **cfg.annotator.params,
            **({"response_format": prompts.REPLY_FORMAT} if mode == "json" else {}),
        },
        "messages": messages,
        "planned": len(items),
    }


def dry_run_item(item: Item, **extra: Any) -> dict[str, Any]:
    ident = {"id": item.id, "persona": item.persona, "stage": item.stage, "kind": item.kind}
    return {**ident, "seed": item.seed.ref, **extra}


def dry_run_own_words(
    settings: AnnotateSettings, workspace: Workspace, item: Item, planned: int
) -> dict[str, Any]:
    """The prompts of an own-words or held-out item: the back-written question (and its analysis)."""
    cfg = settings.annotate
    persona = workspace.persona(item.persona)
    stage = persona.stage(item.stage)
    style = cfg.resolved_question_style(settings.annotator.model)
    messages = {
        f"back_{style}": prompts.build_user_turn_messages(persona, stage, item.kind, item.seed.text, style)
    }
    if item.source == "own_words" and cfg.own_words_analysis:
        reply = reply_cut(item.seed.text, cfg.own_words_max_words)
        messages["analysis"] = prompts.build_own_words_analysis_messages(persona, stage, DRY_RUN_USER, reply)
    return {
        "dry_run": True,
        "item": dry_run_item(item, source=item.source),
        "output": "own_words",
        "params": dict(settings.annotator.params),
        "messages": messages,
        "planned": planned,
    }
