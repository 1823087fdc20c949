"""The run folder, ``runs/<project>/``: the one module that spells its paths, takes the project lock and
writes files atomically.

Every stage reads and writes through ``RunLayout``; ``TREE`` is the folder as the user sees it (the tree
in docs/concepts.md is generated from it and checked by the tests). Writing commands hold the project
lock (``project_lock``) for their whole run, so two of them never interleave in one run folder, and
``write_atomic`` never leaves half a file: a unique temporary name beside the target, fsync, rename.
"""

import contextlib
import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.errors import UserError

# (path under the run folder, what it holds): the run folder as docs/concepts.md shows it.
TREE: list[tuple[str, str]] = [
    ("manifest.json", "resolved config, versions, per-stage fingerprints and status"),
    (".lock", "the project lock: which command is writing here (pid, command, since)"),
    ("cache.sqlite", "every LLM call: request hash, request, response, tokens, timing"),
    (
        "index/<persona>/<stage>/",
        "chunks.jsonl, embeddings.npy, meta.json; heldout.jsonl (held-out passages); exchanges.jsonl, "
        "heldout_exchanges.jsonl (real dialogue, when the stage has some)",
    ),
    ("index/embeddings_cache/", "one .npz per embedder: vectors by text hash"),
    ("annotations/<persona>.jsonl", "one record per dialogue"),
    ("annotations/heldout/<persona>.jsonl", "the held-out passages' questions (evaluation only)"),
    ("failures/<stage>.jsonl", "the items a stage could not finish: id, reason, attempts"),
    ("data/<persona>/", "sft_train.jsonl, sft_test.jsonl, dpo_train.jsonl, stats.json"),
    (
        "models/<persona>/sft, models/<persona>/dpo",
        "LoRA adapter (or full weights), tokenizer, README.md, training.json",
    ),
    (
        "models/<persona>/checkpoints/",
        "training checkpoints, removed once the model is written (unless kept)",
    ),
    (
        "models/<persona>/<variant>.lora.gguf",
        "the adapter as a llama.cpp LoRA file (base_model.backend: llamacpp)",
    ),
    ("eval/", "generations.jsonl, robustness.jsonl, metrics.json, report.md, report.html, plots/"),
    ("converse/<name>/", "multi-agent conversations: transcript.jsonl, transcript.md, measures.json"),
    ("stale/<stage>-<fingerprint>/", "a changed stage's earlier outputs, moved aside (never deleted)"),
]


GENERATION_GGUF = "persllm-generation.f16.gguf"  # a model's own GGUF export for llama.cpp generation


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder."""

    root: Path

    # ------------------------------------------------------------------ top level

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def cache(self) -> Path:
        return self.root / "cache.sqlite"

    def failures(self, stage: str) -> Path:
        return self.root / "failures" / f"{stage}.jsonl"

    def stale(self, stage: str, fingerprint: str) -> Path:
        return self.root / "stale" / f"{stage}-{fingerprint}"

    # ------------------------------------------------------------------ index

    @property
    def index(self) -> Path:
        return self.root / "index"

    def index_stage(self, persona: str, stage: str) -> Path:
        return self.index / persona / stage

    def chunks(self, persona: str, stage: str) -> Path:
        return self.index_stage(persona, stage) / "chunks.jsonl"

    def embeddings(self, persona: str, stage: str) -> Path:
        return self.index_stage(persona, stage) / "embeddings.npy"

    def index_meta(self, persona: str, stage: str) -> Path:
        return self.index_stage(persona, stage) / "meta.json"

    def heldout_chunks(self, persona: str, stage: str) -> Path:
        return self.index_stage(persona, stage) / "heldout.jsonl"

    def exchanges(self, persona: str, stage: str) -> Path:
        return self.index_stage(persona, stage) / "exchanges.jsonl"

    def heldout_exchanges(self, persona: str, stage: str) -> Path:
        return self.index_stage(persona, stage) / "heldout_exchanges.jsonl"

    def embedding_cache(self, model_key: str) -> Path:
        return self.index / "embeddings_cache" / f"{model_key}.npz"

    # ------------------------------------------------------------------ annotations and data

    @property
    def annotations(self) -> Path:
        return self.root / "annotations"

    def dialogues(self, persona: str) -> Path:
        return self.annotations / f"{persona}.jsonl"

    def heldout_questions(self, persona: str) -> Path:
        return self.annotations / "heldout" / f"{persona}.jsonl"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def data_dir(self, persona: str) -> Path:
        return self.data / persona

    def sft_train(self, persona: str) -> Path:
        return self.data_dir(persona) / "sft_train.jsonl"

    def sft_test(self, persona: str) -> Path:
        return self.data_dir(persona) / "sft_test.jsonl"

    def dpo_train(self, persona: str) -> Path:
        return self.data_dir(persona) / "dpo_train.jsonl"

    def stats(self, persona: str) -> Path:
        return self.data_dir(persona) / "stats.json"

    # ------------------------------------------------------------------ models

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, persona: str, variant: str) -> Path:
        """``models/<persona>/<variant>``: ``sft`` or ``dpo`` (only these two; never a request's text)."""
        if variant not in ("sft", "dpo"):
            raise ValueError(f"no model variant {variant!r}")
        return self.models / persona / variant

    def checkpoints(self, persona: str, variant: str) -> Path:
        return self.models / persona / "checkpoints" / variant

    def lora_gguf(self, persona: str, variant: str) -> Path:
        return self.models / persona / f"{variant}.lora.gguf"

    def generation_gguf(self) -> Path:
        return self.models / GENERATION_GGUF

    # ------------------------------------------------------------------ evaluation and conversations

    @property
    def eval(self) -> Path:
        """The evaluation's folder; the report's own files (report.md, report.html, plots/) are named by
        ``evaluate.report``, which writes them into any folder it is given."""
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def generations(self) -> Path:
        return self.eval / "generations.jsonl"

    @property
    def robustness(self) -> Path:
        return self.eval / "robustness.jsonl"

    @property
    def converse(self) -> Path:
        return self.root / "converse"


# Run-folder globs each pipeline stage writes (moved aside when its inputs change) and reads.
STAGE_OUTPUTS: dict[str, list[str]] = {
    "index": ["index/*/*/chunks.jsonl", "index/*/*/heldout.jsonl", "index/*/*/*exchanges.jsonl"],
    "annotate": ["annotations", "failures/annotate.jsonl"],
    "curate": ["data/*/sft_*.jsonl"],
    "pairs": ["data/*/dpo_train.jsonl"],
    "sft": ["models/*/sft", "models/*/checkpoints/sft", "models/*/sft.lora.gguf*"],
    "dpo": ["models/*/dpo", "models/*/checkpoints/dpo", "models/*/dpo.lora.gguf*"],
    "eval": ["eval"],
}
STAGE_INPUTS: dict[str, list[str]] = {
    "index": [],
    "annotate": ["index/*/*/chunks.jsonl", "index/*/*/heldout.jsonl", "index/*/*/*exchanges.jsonl"],
    "curate": ["annotations/*.jsonl"],
    "pairs": ["data/*/sft_*.jsonl", "annotations/*.jsonl"],
    "sft": ["data/*/sft_*.jsonl"],
    "dpo": ["data/*/dpo_train.jsonl", "models/*/sft/*.safetensors"],
    "eval": [
        "data/*/sft_test.jsonl",
        "annotations/heldout/*.jsonl",
        "index/*/*/heldout.jsonl",
        "models/*/*/*.safetensors",
    ],
}


def tree_markdown(project_name: str = "<project>") -> str:
    """The run folder as the fenced block docs/concepts.md shows."""
    width = max(len(path) for path, _ in TREE) + 2
    lines = [f"runs/{project_name}/"] + [f"  {path:<{width}}{what}" for path, what in TREE]
    return "```\n" + "\n".join(lines) + "\n```\n"


# --------------------------------------------------------------------------- atomic writes


def temporary_path(path: Path) -> Path:
    """A name beside ``path`` that is this write's own (two writers never share a temporary file)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so a reader (or a crash) sees the old file or the new, never half.

    The temporary file has a name of its own per call (two writers never share one), is fsynced, then
    renamed over the target; the folder is fsynced so the rename itself survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with tmp.open("wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), blocking until it is free."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the project lock

_held: dict[Path, int] = {}  # lock file -> depth, so a command's own stages take it again freely
_held_guard = threading.Lock()


@contextlib.contextmanager
def project_lock(layout: RunLayout, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the run folder's lock for ``command``; re-entrant within this process.

    A second process asking for it gets a one-line UserError naming the holder, or (``wait``) waits.
    The lock file keeps the holder's pid, command and start time; the lock itself is an ``flock``, so a
    killed holder releases it with its process.
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    path = layout.lock.resolve()
    with _held_guard:
        depth = _held.get(path, 0)
        if depth:
            _held[path] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                handle.close()
                raise UserError(
                    f"{layout.root}: in use by {holder}; wait for it to finish, or pass --wait to queue"
                ) from None
            print(f"waiting for {holder} to finish with {layout.root} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": since}) + "\n")
        handle.flush()
        with _held_guard:
            _held[path] = 1
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(path, None)
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8") or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return "another persllm command"
    return (
        f"`persllm {info.get('command', '?')}` (pid {info.get('pid', '?')}, since {info.get('since', '?')})"
    )
