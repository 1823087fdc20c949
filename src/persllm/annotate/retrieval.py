"""Retrieval for many concurrent dialogues: queued, run off the event loop, in batches, on parallel workers.

With dozens of dialogues in flight the annotator's bottleneck moves from the model server to
embedding the retrieval queries on the CPU (MiniLM on one core: 15 ms for a query alone, about 6 ms
a query in a batch of 16), and every dialogue waiting for its context holds a concurrency slot.
Requests are queued; up to ``workers`` batches run at once, each in its own thread
(``encoder.query_workers``: one per group of cores the encoder's torch threads use, since torch
releases the GIL while it computes). An idle queue starts a batch at once; beside running batches
another starts only for ``MIN_PARALLEL`` or more waiting requests, and idle workers split a burst
between them. Batches of at most ``MAX_BATCH`` keep dialogues flowing: the first go on to the model
while the next are embedded (on two cores, 8 beat 16 and 4 at concurrency 64). Each batch goes to
``Retriever.retrieve_many`` per persona and stage: one encoder call for all its queries.
"""

import asyncio
import time
from dataclasses import dataclass

from persllm.index import encoder
from persllm.index.retrieve import Context, Retriever
from persllm.persona.corpus import Chunk

MAX_BATCH = 8
MIN_PARALLEL = 2


@dataclass
class _Request:
    persona: str
    stage: str
    query: str
    seed: Chunk | None
    future: "asyncio.Future[Context]"


class RetrievalQueue:
    """Batches ``retriever.retrieve`` calls made from coroutines on one event loop at a time.

    Args:
        retriever: the project's retriever (shared by the worker threads).
        workers: batches run at once (default ``encoder.query_workers`` of the project's embedder).
        max_batch: most requests in one batch.
        min_parallel: fewest waiting requests that start a batch beside one already running.
    """

    def __init__(
        self,
        retriever: Retriever,
        workers: int | None = None,
        max_batch: int = MAX_BATCH,
        min_parallel: int = MIN_PARALLEL,
    ) -> None:
        self.retriever = retriever
        self._workers = workers
        self.max_batch = max(1, max_batch)
        self.min_parallel = max(1, min_parallel)
        self.batches = 0  # how many batches ran (a batch of 1 per query means no batching happened)
        self.most_at_once = 0  # the most batches that ran at the same time
        self.queries = 0  # requests served
        self.busy_seconds = 0.0  # summed over the workers: above the run's wall time means parallel work
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Request] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False

    @property
    def workers(self) -> int:
        """Batches that may run at once (resolved on first use: it may load torch)."""
        if self._workers is None:
            self._workers = encoder.query_workers(self.retriever.embedder)
        return max(1, self._workers)

    async def retrieve(self, persona: str, stage: str, query: str, seed: Chunk | None = None) -> Context:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new asyncio.run(): start afresh
            self._loop, self._pending, self._running, self._tasks = loop, [], 0, set()
            self._scheduled = False
        future: asyncio.Future[Context] = loop.create_future()
        self._pending.append(_Request(persona, stage, query, seed, future))
        if not self._scheduled:  # requests made in the same tick join the same batches
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await future

    def _dispatch(self) -> None:
        """Start batches while a worker is free and what waits is worth one.

        An idle queue starts at once, whatever waits. Beside a running batch, another starts only for
        ``min_parallel`` or more requests: one query alone takes the encoder 15 ms, four together 32 ms,
        and on a busy CPU tiny parallel batches would only queue for the same cores. Idle workers split
        a burst between them.
        """
        self._scheduled = False
        assert self._loop is not None
        while self._pending and self._running < self.workers:
            if self._running and len(self._pending) < self.min_parallel:
                return  # the running batch takes them when it is done
            shares = max(1, min(self.workers - self._running, len(self._pending) // self.min_parallel))
            size = min(self.max_batch, -(-len(self._pending) // shares))
            batch, self._pending = self._pending[:size], self._pending[size:]
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
            task = self._loop.create_task(self._work(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _work(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self._run, batch)
        except BaseException as exc:  # cancelled with its loop, or the process is going down
            for request in batch:
                if request.future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    request.future.cancel()
                else:
                    request.future.set_exception(exc)
            raise
        finally:
            self._running -= 1
            self.busy_seconds += time.perf_counter() - started
        self.batches += 1
        self.queries += len(batch)
        for request, result in zip(batch, results, strict=True):
            if request.future.done():
                continue
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)
        self._dispatch()

    def _run(self, batch: list[_Request]) -> list[Context | BaseException]:
        """Contexts (or the error of each failed request) in ``batch`` order."""
        results: list[Context | BaseException] = [RuntimeError("not retrieved")] * len(batch)
        groups: dict[tuple[str, str], list[int]] = {}
        for index, request in enumerate(batch):
            groups.setdefault((request.persona, request.stage), []).append(index)
        for (persona, stage), indexes in groups.items():
            queries, seeds = [batch[i].query for i in indexes], [batch[i].seed for i in indexes]
            contexts: list[Context | BaseException]
            try:
                contexts = list(self.retriever.retrieve_many(persona, stage, queries, seeds))
            except Exception:
                # One bad request must not fail its neighbours: retry one by one to find it.
                contexts = [self._one(persona, stage, batch[i]) for i in indexes]
            for i, context in zip(indexes, contexts, strict=True):
                results[i] = context
        return results

    def _one(self, persona: str, stage: str, request: _Request) -> Context | BaseException:
        try:
            return self.retriever.retrieve(persona, stage, request.query, request.seed)
        except Exception as exc:
            return exc
