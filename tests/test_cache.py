"""The SQLite call cache: keys, hits without requests, the log, migrations, and surviving kill -9."""

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from persllm.errors import UserError
from persllm.llm import CachedBackend, CallCache, Completion, LLMConfig, LLMError, make_backend, run_sync
from persllm.llm.cache import MIGRATIONS, canonical_request, request_key
from tests.fake_openai import FakeOpenAI, Fault

QUESTIONS = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]


def key(params: dict[str, Any], messages: list[dict[str, str]] | None = None, **who: Any) -> str:
    ident = {"backend": "openai", "model": "m", "adapter": None, **who}
    return request_key(canonical_request(messages=messages or QUESTIONS[0], params=params, **ident))


def test_key_covers_exactly_what_changes_the_answer() -> None:
    base = key({"temperature": 0.7, "max_tokens": 64})
    # Same request: number spelling, stop as str or list, and non-output params do not matter.
    assert base == key({"temperature": 0.70, "max_tokens": 64, "timeout": 3, "tag": "annotate"})
    assert key({"temperature": 0, "stop": "x"}) == key({"temperature": 0.0, "stop": ["x"]})
    # Anything that can change the reply does.
    others = {
        key({"temperature": 0.8, "max_tokens": 64}),
        key({"temperature": 0.7, "max_tokens": 65}),
        key({"temperature": 0.7, "max_tokens": 64, "seed": 1}),
        key({"temperature": 0.7, "max_tokens": 64, "n_sample": 1}),
        key({"temperature": 0.7, "max_tokens": 64, "response_format": {"type": "object"}}),
        key({"temperature": 0.7, "max_tokens": 64}, QUESTIONS[1]),
        key({"temperature": 0.7, "max_tokens": 64}, model="other"),
        key({"temperature": 0.7, "max_tokens": 64}, adapter="lora:abc"),
        key({"temperature": 0.7, "max_tokens": 64}, backend="transformers"),
    }
    assert base not in others and len(others) == 9
    assert base.startswith("v1-")


def openai_cfg(server: FakeOpenAI) -> LLMConfig:
    return LLMConfig(backend="openai", model="fake-model", base_url=server.base_url, concurrency=4)


async def ask_all(llm: Any, params: dict[str, Any]) -> list[Completion]:
    return await asyncio.gather(*[llm.generate(q, params) for q in QUESTIONS])


def test_rerun_is_served_from_the_cache_with_zero_requests(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    with FakeOpenAI(latency=0.02) as server:
        first = run_sync(ask_all(make_backend(openai_cfg(server), CallCache(path), tag="annotate"), {}))
        assert len(server.requests) == 5 and not any(c.cached for c in first)
        # A fresh process would open the same file: a new CallCache and backend.
        llm = make_backend(openai_cfg(server), CallCache(path), tag="annotate")
        again = run_sync(ask_all(llm, {"tag": "rerun"}))
        assert len(server.requests) == 5
    assert [c.text for c in again] == [c.text for c in first]
    assert all(c.cached for c in again)
    assert [c.completion_tokens for c in again] == [c.completion_tokens for c in first]
    assert isinstance(llm, CachedBackend) and llm.inner.name == "openai" and llm.model_id == "fake-model"


def test_samples_are_cached_per_sample_index(tmp_path: Path) -> None:
    with FakeOpenAI() as server:
        llm = make_backend(openai_cfg(server), CallCache(tmp_path / "c.sqlite"))
        for _ in range(2):
            for index in range(3):
                run_sync(llm.generate(QUESTIONS[0], {"temperature": 1.0, "n_sample": index}))
    assert len(server.requests) == 3
    assert all("n_sample" not in body for body in server.requests)


def test_identical_requests_in_flight_reach_the_model_once(tmp_path: Path) -> None:
    async def same_three(llm: Any) -> list[Completion]:
        return await asyncio.gather(*[llm.generate(QUESTIONS[2], {}) for _ in range(3)])

    async def same_two(llm: Any) -> list[Completion]:
        return await asyncio.gather(*[llm.generate(QUESTIONS[3], {}) for _ in range(2)])

    with FakeOpenAI(latency=0.1) as server:
        cache = CallCache(tmp_path / "c.sqlite")
        replies = run_sync(same_three(make_backend(openai_cfg(server), cache)))
        assert len(server.requests) == 1
        server.queue(*[Fault(status=500)] * 2)
        failing = make_backend(openai_cfg(server).model_copy(update={"max_retries": 1}), cache)
        with pytest.raises(LLMError):
            run_sync(same_two(failing))
        assert len(server.requests) == 3
    assert {r.text for r in replies} == {"You said: question 2"}
    assert sorted(r.cached for r in replies) == [False, True, True]
    assert cache.stats()["hits"] == 2


def test_stream_through_the_cache(tmp_path: Path) -> None:
    async def collect(llm: Any) -> str:
        return "".join([piece async for piece in llm.stream(QUESTIONS[1], {})])

    with FakeOpenAI() as server:
        llm = make_backend(openai_cfg(server), CallCache(tmp_path / "c.sqlite"))
        assert run_sync(collect(llm)) == "You said: question 1"
        assert run_sync(collect(llm)) == "You said: question 1"
        assert run_sync(llm.generate(QUESTIONS[1], {})).cached
    assert len(server.requests) == 1


def test_recent_and_stats(tmp_path: Path) -> None:
    cache = CallCache(tmp_path / "c.sqlite")
    for i in range(3):
        request = canonical_request("openai", "m", None, QUESTIONS[i], {"temperature": 0.5})
        cache.put(request_key(request), request, Completion(f"reply {i}", "stop", 10, i, 0.5), tag="annotate")
    first = canonical_request("openai", "m", None, QUESTIONS[0], {"temperature": 0.5})
    assert cache.get(request_key(first), tag="evaluate") == Completion("reply 0", "stop", 10, 0, 0.5, True)
    assert cache.get("v1-missing") is None

    rows = cache.recent(3)
    assert [(r["response"], r["cached"]) for r in rows] == [
        ("reply 0", True),
        ("reply 2", False),
        ("reply 1", False),
    ]
    assert rows[0]["request"]["messages"] == QUESTIONS[0] and rows[0]["tag"] == "evaluate"
    assert [r["response"] for r in cache.recent(10, tag="annotate")] == ["reply 2", "reply 1", "reply 0"]
    assert cache.stats() == {
        "calls": 3,
        "hits": 1,
        "prompt_tokens": 30,
        "completion_tokens": 3,
        "seconds": 1.5,
        "by_tag": {"annotate": 3},
    }


def test_migrations_run_forward_and_keep_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version VALUES (1)")
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute(
        "INSERT INTO calls VALUES ('k', 1.0, 'openai', 'm', '{}', 'old reply', 'stop', 1, 2, 0.1, NULL)"
    )
    db.commit()
    db.close()

    cache = CallCache(path)
    assert cache.version == len(MIGRATIONS) == 2
    assert cache.get("k") is not None and cache.get("k").text == "old reply"  # type: ignore[union-attr]
    assert cache.stats()["hits"] == 2  # the hits table exists now
    cache.close()
    assert CallCache(path).version == 2  # reopening is a no-op


def test_unusable_files_are_user_errors(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    CallCache(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="newer persllm"):
        CallCache(newer)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(UserError, match="move the file away"):
        CallCache(garbage)


WRITER = """
import sys, time
from persllm.llm.cache import CallCache, canonical_request, request_key
from persllm.llm.base import Completion
cache = CallCache(sys.argv[1])
i = 0
while True:
    request = canonical_request("openai", "m", None, [{"role": "user", "content": f"q{i}"}], {})
    cache.put(request_key(request), request, Completion("x" * 2000 + str(i), "stop", 5, 7, 0.1))
    i += 1
"""


def test_kill_9_mid_writes_leaves_a_usable_database(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        deadline = time.time() + 60
        seen = 0
        while seen < 200 and time.time() < deadline:
            time.sleep(0.05)
            if path.exists():
                try:
                    with sqlite3.connect(path, timeout=5) as db:
                        seen = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
                except sqlite3.OperationalError:
                    pass  # the writer is still creating the tables
        assert seen >= 200, "the writer did not get going"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL

    cache = CallCache(path)
    assert len(cache) >= seen  # every committed row survived
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = cache.recent(len(cache))
    assert all(json.loads(json.dumps(r["request"]))["messages"] for r in rows)
    assert all(r["response"].startswith("x" * 2000) for r in rows)
    request = canonical_request("openai", "m", None, [{"role": "user", "content": "after"}], {})
    cache.put(request_key(request), request, Completion("still writable"))
    assert cache.get(request_key(request)) is not None
