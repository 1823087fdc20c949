"""Retrieval for many concurrent dialogues: queued, run off the event loop, in batches.

With dozens of dialogues in flight the annotator's bottleneck moves from the model server to
embedding the retrieval queries on the CPU. Requests made while a batch runs wait and form the next
batch, which goes to ``Retriever.retrieve_many`` per persona and stage: one encoder call for all its
queries, in one worker thread, so concurrent dialogues never fight over the CPU.
"""

import asyncio
from dataclasses import dataclass

from persllm.index.retrieve import Context, Retriever
from persllm.persona.corpus import Chunk

MAX_BATCH = 16


@dataclass
class _Request:
    persona: str
    stage: str
    query: str
    seed: Chunk | None
    future: "asyncio.Future[Context]"


class RetrievalQueue:
    """Batches ``retriever.retrieve`` calls made from coroutines on one event loop at a time."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self.batches = 0  # how many batches ran (a batch of 1 per query means no batching happened)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Request] = []
        self._task: asyncio.Task[None] | None = None

    async def retrieve(self, persona: str, stage: str, query: str, seed: Chunk | None = None) -> Context:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new asyncio.run(): start afresh
            self._loop, self._pending, self._task = loop, [], None
        future: asyncio.Future[Context] = loop.create_future()
        self._pending.append(_Request(persona, stage, query, seed, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # requests made in the same tick join the first batch
        while self._pending:
            # Modest batches keep dialogues flowing: the first ones go on to the model while the
            # next are embedded, instead of every dialogue waiting for one large batch.
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            results = await asyncio.to_thread(self._run, batch)
            self.batches += 1
            for request, result in zip(batch, results, strict=True):
                if request.future.done():
                    continue
                if isinstance(result, BaseException):
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)

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
