"""Streaming from a local transformers model inside its generate batches.

A streamed request joins the same batches as plain ones (``TransformersBackend``'s batcher). While
``model.generate`` runs a batch in a worker thread, ``BatchStreamer`` receives each step's new token of
every row, decodes it and sends the text to that row's ``RowSink``; the request's coroutine reads the
sink (``read_sink``), holding stop strings back until they can no longer start. A consumer that goes
away (a closed chat, a dropped HTTP client) marks its sink gone: its row is no longer decoded and stops
generating, and the batch ends once every row has. transformers' own TextIteratorStreamer refuses
batches of more than one row, hence this one.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

END = None  # what a sink receives after a row's last piece


class RowSink:
    """One streamed reply's end of a batch: text from the generating thread to the consumer's loop.

    Args:
        loop: the event loop of the consumer (``read_sink``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self.gone = False  # set by the consumer when it stops reading; read by the generating thread
        self.closed = False

    def put(self, item: str) -> None:
        if not self.gone and not self.closed:
            self._send(item)

    def close(self, error: BaseException | None = None) -> None:
        """Send the end of the reply (or ``error``) once."""
        if not self.closed:
            self.closed = True
            self._send(error)

    def _send(self, item: str | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is left to read
            self.gone = True


class BatchStreamer:
    """A ``model.generate`` streamer for a whole batch: rows with a sink get their text as it is made,
    rows without one (plain requests) are left to the batch's result.

    Args:
        tokenizer: decodes the tokens.
        sinks: per row of the batch, its sink or None.
        end_ids: tokens that end a row (end of text, padding after a row has finished).
    """

    def __init__(self, tokenizer: Any, sinks: list[RowSink | None], end_ids: set[int]) -> None:
        self.rows = [None if sink is None else _RowText(tokenizer, sink, end_ids) for sink in sinks]

    def put(self, value: Any) -> None:
        if value.dim() > 1:  # generate hands over the prompt first
            return
        for row, token in zip(self.rows, value.tolist(), strict=True):
            if row is not None:
                row.add(int(token))

    def end(self) -> None:
        for row in self.rows:
            if row is not None:
                row.finish()


class _RowText:
    """The text of one row, sent piece by piece. Each piece is the decoded difference between a short
    window of tokens with and without the newest ones (as TGI does), so a character split over several
    tokens is sent whole and a word keeps its leading space, without decoding the whole row each step."""

    def __init__(self, tokenizer: Any, sink: RowSink, end_ids: set[int]) -> None:
        self.tokenizer, self.sink, self.end_ids = tokenizer, sink, end_ids
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is decoded and sent; ids[read:] is not yet
        self.done = False

    def add(self, token: int) -> None:
        if self.done:
            return
        if self.sink.gone:
            self.done = True
            return
        if token in self.end_ids:
            self.finish()
            return
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.sink.put(after[len(before) :])
            self.prefix, self.read = self.read, len(self.ids)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            self.sink.put(self._decode(self.ids[self.prefix :])[len(before) :])
        self.sink.close()

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""


async def read_sink(sink: RowSink, stops: list[str]) -> AsyncIterator[str]:
    """Yield the text that reaches ``sink``, cut before the first of ``stops``.

    Text that could be the start of a stop string is held back until it is clear it is not. Leaving
    (the reply is cut, or the consumer stops iterating) marks the sink gone.
    """
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    try:
        while (item := await sink.queue.get()) is not END:
            if isinstance(item, BaseException):
                raise item
            text += item
            # text[:sent] was sent with hold characters after it: no stop string starts before sent
            cut = min((i for i in (text.find(s, sent) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    yield text[sent:cut]
                return
            if len(text) - hold > sent:
                yield text[sent : len(text) - hold]
                sent = len(text) - hold
        if len(text) > sent:
            yield text[sent:]
    finally:
        sink.gone = True
