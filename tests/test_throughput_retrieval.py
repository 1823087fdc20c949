"""The annotator's retrieval queue: batches on parallel workers, and how many workers the encoder allows.

A scripted retriever stands in for the encoder, so what is checked is the scheduling: which requests
share a batch, and which batches run at the same time (threads meeting at a barrier prove it).
"""

import asyncio
import os
import threading
from typing import Any

import pytest

from persllm.annotate.retrieval import RetrievalQueue
from persllm.config import EmbedderConfig
from persllm.index import encoder
from persllm.index.retrieve import Context
from persllm.llm import run_sync


class Scripted:
    """A retriever whose ``retrieve_many`` records its batches and may wait (for a gate or for peers)."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.barrier = barrier
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.batches: list[list[str]] = []
        self.at_once = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def retrieve_many(self, persona: str, stage: str, queries: list[str], seeds: Any) -> list[Context]:
        with self._lock:
            self.batches.append(list(queries))
            self.at_once += 1
            self.most_at_once = max(self.most_at_once, self.at_once)
        self.started.set()
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=30)
            assert self.gate.wait(timeout=30)
            if any(query == "boom" for query in queries):
                raise ValueError("a bad query")
            return [Context(persona, stage, query) for query in queries]
        finally:
            with self._lock:
                self.at_once -= 1

    def retrieve(self, persona: str, stage: str, query: str, seed: Any = None) -> Context:
        return self.retrieve_many(persona, stage, [query], [seed])[0]


def ask(queue: RetrievalQueue, queries: list[str]) -> list[Any]:
    async def many() -> list[Any]:
        calls = [queue.retrieve("ada", "mate", query) for query in queries]
        return await asyncio.gather(*calls, return_exceptions=True)

    return run_sync(many())


def test_a_burst_is_split_over_parallel_workers() -> None:
    # Two batches must be inside retrieve_many at the same time, or the barrier breaks.
    retriever = Scripted(barrier=threading.Barrier(2))
    queue = RetrievalQueue(retriever, workers=2, max_batch=16)  # type: ignore[arg-type]
    queries = [f"q{i}" for i in range(20)]
    results = ask(queue, queries)
    assert [context.query for context in results] == queries  # answers in request order
    assert sorted(len(batch) for batch in retriever.batches) == [10, 10]
    assert retriever.most_at_once == 2 and queue.most_at_once == 2
    assert queue.batches == 2 and queue.queries == 20


def test_one_worker_runs_one_batch_at_a_time() -> None:
    retriever = Scripted()
    queue = RetrievalQueue(retriever, workers=1, max_batch=16)  # type: ignore[arg-type]
    queries = [f"q{i}" for i in range(40)]
    assert [context.query for context in ask(queue, queries)] == queries
    assert [len(batch) for batch in retriever.batches] == [16, 16, 8]
    assert retriever.most_at_once == 1 and queue.most_at_once == 1


def test_a_small_backlog_waits_for_the_running_batch() -> None:
    retriever = Scripted()
    retriever.gate.clear()  # the first batch runs until the test lets it finish
    queue = RetrievalQueue(retriever, workers=2, min_parallel=4)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(queue.retrieve("ada", "mate", "alone"))
        while not retriever.started.is_set():
            await asyncio.sleep(0.01)
        few = [asyncio.ensure_future(queue.retrieve("ada", "mate", f"few{i}")) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        running_then = len(retriever.batches)  # 3 waiting requests are not worth a second worker
        more = [asyncio.ensure_future(queue.retrieve("ada", "mate", f"more{i}")) for i in range(2)]
        while len(retriever.batches) < 2:  # 5 waiting are: a second batch starts beside the first
            await asyncio.sleep(0.01)
        retriever.gate.set()
        done = await asyncio.gather(first, *few, *more)
        return [running_then, *done]

    running_then, *contexts = run_sync(scenario())
    assert running_then == 1
    assert [c.query for c in contexts] == ["alone", "few0", "few1", "few2", "more0", "more1"]
    assert retriever.batches == [["alone"], ["few0", "few1", "few2", "more0", "more1"]]
    assert queue.most_at_once == 2


def test_errors_stay_with_their_request_under_parallel_workers() -> None:
    retriever = Scripted()
    queue = RetrievalQueue(retriever, workers=3)  # type: ignore[arg-type]
    queries = [f"q{i}" for i in range(30)]
    queries[7] = "boom"
    results = ask(queue, queries)
    assert isinstance(results[7], ValueError)
    assert [r.query for i, r in enumerate(results) if i != 7] == [q for i, q in enumerate(queries) if i != 7]


def test_a_new_event_loop_starts_afresh() -> None:
    queue = RetrievalQueue(Scripted(), workers=2)  # type: ignore[arg-type]
    assert [c.query for c in ask(queue, ["a", "b"])] == ["a", "b"]
    assert [c.query for c in ask(queue, ["c"])] == ["c"]


@pytest.mark.parametrize(
    ("device", "cores", "threads", "workers"),
    [
        ("cpu", 2, 1, 2),
        ("cpu", 2, 2, 1),
        ("cpu", 8, 2, 4),
        ("cpu", 64, 1, 4),
        ("cpu", 1, 4, 1),
        ("cuda", 8, 1, 1),
    ],
)
def test_query_workers_share_the_cores_between_torch_threads(
    monkeypatch: pytest.MonkeyPatch, device: str, cores: int, threads: int, workers: int
) -> None:
    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert encoder.query_workers(EmbedderConfig(device=device)) == workers


def test_queue_asks_the_encoder_for_its_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[EmbedderConfig] = []

    def workers(cfg: EmbedderConfig) -> int:
        asked.append(cfg)
        return 3

    monkeypatch.setattr(encoder, "query_workers", workers)
    retriever = Scripted()
    retriever.embedder = EmbedderConfig()  # type: ignore[attr-defined]
    queue = RetrievalQueue(retriever)  # type: ignore[arg-type]
    assert queue.workers == 3 and queue.workers == 3 and len(asked) == 1  # asked once, lazily


def test_batches_stay_within_max_batch_on_every_worker() -> None:
    retriever = Scripted()
    queue = RetrievalQueue(retriever, workers=2, max_batch=8)  # type: ignore[arg-type]
    queries = [f"q{i}" for i in range(41)]
    assert [c.query for c in ask(queue, queries)] == queries
    assert max(len(batch) for batch in retriever.batches) == 8
    assert sorted(q for batch in retriever.batches for q in batch) == sorted(queries)  # each once
