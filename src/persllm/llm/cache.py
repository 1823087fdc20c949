"""Every LLM call, cached and logged in SQLite (``runs/<project>/cache.sqlite``).

One row per distinct request in ``calls`` (the cache); one row per answer served from it in ``hits``
(so ``persllm logs`` can show re-runs). WAL mode and one commit per insert: a process killed at any
moment leaves a usable database, losing at most the call in flight. Several processes may share the
file (``busy_timeout``). The schema only moves forward: ``MIGRATIONS[i]`` takes version i to i + 1.

Sampled calls (temperature > 0) are cached like any other: a re-run gets the same text back. A caller
that wants several different samples of one request puts ``"n_sample": i`` into its params.
"""

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from persllm.errors import UserError
from persllm.hashing import stable_hash
from persllm.llm.base import OUTPUT_PARAMS, ChatBackend, Completion, Message, merge_params, stop_list

KEY_VERSION = 1  # bump when the canonical request changes meaning: old rows then simply stop matching

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE calls (
            key TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            backend TEXT NOT NULL,
            model TEXT NOT NULL,
            request TEXT NOT NULL,
            response TEXT NOT NULL,
            finish_reason TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            seconds REAL,
            tag TEXT
        )""",
        "CREATE INDEX calls_created_at ON calls(created_at)",
    ],
    [
        """CREATE TABLE hits (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL,
            created_at REAL NOT NULL,
            tag TEXT
        )""",
        "CREATE INDEX hits_created_at ON hits(created_at)",
    ],
]

# Not model inputs: never sent, but n_sample separates samples in the cache.
CALL_ONLY_PARAMS = ("n_sample", "tag")


def canonical_request(
    backend: str,
    model: str,
    adapter: Any,
    messages: list[Message],
    params: dict[str, Any],
    weights: str | None = None,
) -> dict[str, Any]:
    """The part of a call that decides its answer, normalised so equal requests compare equal."""
    kept: dict[str, Any] = {}
    for name in (*OUTPUT_PARAMS, "n_sample"):
        value = params.get(name)
        if value is None:
            continue
        if name in ("temperature", "top_p"):
            value = float(value)
        elif name in ("max_tokens", "seed", "n_sample"):
            value = int(value)
        elif name == "stop":
            value = stop_list(value) or None
        if value is not None:
            kept[name] = value
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    request = {"backend": backend, "model": model, "adapter": adapter, "messages": turns, "params": kept}
    if weights:
        request["weights"] = weights
    return request


def request_key(request: dict[str, Any]) -> str:
    """The versioned cache key of a canonical request."""
    return f"v{KEY_VERSION}-{stable_hash(request, length=32)}"


class CallCache:
    """The SQLite call cache and log. Thread-safe; share one instance per process and file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode: a commit survives the process being killed (not a power cut).
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise UserError(
                f"{self.path}: not a usable SQLite cache ({exc}); move the file away to start a fresh cache"
            ) from None

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = self._db.execute("SELECT version FROM schema_version").fetchone()
                version = row[0] if row else 0
                if row is None:
                    self._db.execute("INSERT INTO schema_version VALUES (0)")
                if version > len(MIGRATIONS):
                    raise UserError(
                        f"{self.path}: written by a newer persllm (schema {version}); "
                        "upgrade persllm or move the file away"
                    )
                for statements in MIGRATIONS[version:]:
                    for statement in statements:
                        self._db.execute(statement)
                self._db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @property
    def version(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT version FROM schema_version").fetchone()[0])

    def get(self, key: str, tag: str | None = None, log_hit: bool = True) -> Completion | None:
        """The cached completion for ``key`` (``cached=True``), logging the hit; None on a miss."""
        with self._lock:
            row = self._db.execute(
                "SELECT response, finish_reason, prompt_tokens, completion_tokens, seconds"
                " FROM calls WHERE key = ?",
                (key,),
            ).fetchone()
            if row is None:
                return None
            if log_hit:
                self._db.execute(
                    "INSERT INTO hits (key, created_at, tag) VALUES (?, ?, ?)", (key, time.time(), tag)
                )
        text, finish, prompt_tokens, completion_tokens, seconds = row
        return Completion(
            text, finish or "stop", prompt_tokens or 0, completion_tokens or 0, seconds or 0.0, True
        )

    def put(self, key: str, request: dict[str, Any], completion: Completion, tag: str | None = None) -> None:
        """Store one answered call (committed before returning). A key stored twice keeps the first."""
        row = (
            key,
            time.time(),
            str(request.get("backend", "")),
            str(request.get("model", "")),
            json.dumps(request, ensure_ascii=False, default=str),
            completion.text,
            completion.finish_reason,
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.seconds,
            tag,
        )
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def recent(self, n: int = 20, tag: str | None = None) -> list[dict[str, Any]]:
        """The last ``n`` calls, newest first: answered ones (``cached`` False) and cache hits (True)."""
        calls_where, hits_where = ("WHERE c.tag = ?", "WHERE h.tag = ?") if tag else ("", "")
        query = f"""
            SELECT c.created_at, c.key, c.tag, 0 AS cached, c.backend, c.model, c.request, c.response,
                   c.finish_reason, c.prompt_tokens, c.completion_tokens, c.seconds, c.rowid AS seq
            FROM calls c {calls_where}
            UNION ALL
            SELECT h.created_at, h.key, h.tag, 1 AS cached, c.backend, c.model, c.request, c.response,
                   c.finish_reason, c.prompt_tokens, c.completion_tokens, c.seconds, h.id AS seq
            FROM hits h JOIN calls c ON c.key = h.key {hits_where}
            ORDER BY created_at DESC, cached DESC, seq DESC LIMIT ?
        """
        args: tuple[Any, ...] = (tag, tag, n) if tag else (n,)
        with self._lock:
            cursor = self._db.execute(query, args)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
        for row in rows:
            del row["seq"]  # only the tie-break of calls written in the same clock tick
            row["cached"] = bool(row["cached"])
            row["request"] = json.loads(row["request"])
        return rows

    def stats(self) -> dict[str, Any]:
        """Totals: calls answered, cache hits, tokens and model seconds, per tag."""
        with self._lock:
            calls, prompt, completion, seconds = self._db.execute(
                "SELECT COUNT(*), TOTAL(prompt_tokens), TOTAL(completion_tokens), TOTAL(seconds) FROM calls"
            ).fetchone()
            hits = self._db.execute("SELECT COUNT(*) FROM hits").fetchone()[0]
            tags = self._db.execute("SELECT COALESCE(tag, ''), COUNT(*) FROM calls GROUP BY tag").fetchall()
        return {
            "calls": calls,
            "hits": hits,
            "prompt_tokens": int(prompt),
            "completion_tokens": int(completion),
            "seconds": round(seconds, 3),
            "by_tag": {name: count for name, count in tags},
        }

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_cache(project: Any) -> CallCache:
    """The project's cache: ``<run_dir>/cache.sqlite``."""
    return CallCache(project.layout.cache)


class CachedBackend:
    """A backend whose calls go through a ``CallCache``: same interface, the real one is ``.inner``."""

    def __init__(self, inner: ChatBackend, cache: CallCache, tag: str | None = None) -> None:
        self.inner = inner
        self.cache = cache
        self.tag = tag
        self._running: dict[str, asyncio.Future[Completion]] = {}

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def supports_json_schema(self) -> bool:
        return self.inner.supports_json_schema

    def __getattr__(self, attr: str) -> Any:
        # add_adapter, load, cfg ... of the wrapped backend
        if attr in ("inner", "__setstate__"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def request(self, messages: list[Message], params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The cache key and canonical request of one call."""
        defaults = getattr(getattr(self.inner, "cfg", None), "params", {}) or {}
        merged = merge_params(defaults, params)
        # A local backend names the weights it will use (a retrained adapter must not hit old rows).
        identity = getattr(self.inner, "cache_identity", None)
        ident = identity(merged) if callable(identity) else {}
        adapter = ident.get("adapter", merged.get("adapter"))
        weights = ident.get("weights")
        request = canonical_request(self.inner.name, self.inner.model_id, adapter, messages, merged, weights)
        return request_key(request), request

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion:
        key, request = self.request(messages, params)
        tag = params.get("tag") or self.tag
        hit = self.cache.get(key, tag)
        if hit is not None:
            return hit
        # The same request already on its way (e.g. two identical prompts in one batch): wait for it.
        running = self._running.get(key)
        if running is not None and running.get_loop() is asyncio.get_running_loop():
            try:
                first = await asyncio.shield(running)
            except asyncio.CancelledError:
                if not running.cancelled():
                    raise  # this caller was cancelled, not the first one
            else:
                return self.cache.get(key, tag) or replace(first, cached=True)
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            completion = await self.inner.generate(messages, params)
            self.cache.put(key, request, completion, tag)
            future.set_result(completion)
            return completion
        except asyncio.CancelledError:
            future.cancel()  # waiters then call the model themselves
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark it retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            self._running.pop(key, None)

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]:
        """Stream from the model, or the whole cached text at once; a finished stream is stored."""
        key, request = self.request(messages, params)
        tag = params.get("tag") or self.tag
        hit = self.cache.get(key, tag)
        if hit is not None:
            yield hit.text
            return
        parts: list[str] = []
        started = time.perf_counter()
        async for piece in self.inner.stream(messages, params):
            parts.append(piece)
            yield piece
        completion = Completion("".join(parts), seconds=time.perf_counter() - started)
        self.cache.put(key, request, completion, tag)

    def generate_batch(self, conversations: list[list[Message]], params: dict[str, Any]) -> list[Completion]:
        """Synchronous batch (transformers): only the misses reach the model."""
        keyed = [self.request(messages, params) for messages in conversations]
        tag = params.get("tag") or self.tag
        results: list[Completion | None] = [self.cache.get(key, tag) for key, _ in keyed]
        misses = [i for i, result in enumerate(results) if result is None]
        if misses:
            fresh = self.inner.generate_batch([conversations[i] for i in misses], params)  # type: ignore[attr-defined]
            for i, completion in zip(misses, fresh, strict=True):
                self.cache.put(keyed[i][0], keyed[i][1], completion, tag)
                results[i] = completion
        return [result for result in results if result is not None]

    async def aclose(self) -> None:
        await self.inner.aclose()
