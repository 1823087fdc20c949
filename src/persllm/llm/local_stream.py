"""Streaming from a local transformers model: ``model.generate`` in a thread feeding a
``TextIteratorStreamer``, stop strings held back until they can no longer start, and generation
stopped as soon as the consumer goes away (a closed chat, a dropped HTTP client)."""

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from persllm.llm.base import Message, stop_list


async def stream_text(
    backend: Any, tokenizer: Any, messages: list[Message], params: dict[str, Any], adapter: str | None
) -> AsyncIterator[str]:
    """Yield text pieces of one reply of ``backend`` (a loaded ``TransformersBackend``)."""
    from transformers import TextIteratorStreamer

    from persllm.llm.transformers_backend import generation_kwargs, render_prompt

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()
    failure: list[BaseException] = []
    batch = tokenizer([render_prompt(tokenizer, messages)], return_tensors="pt", add_special_tokens=False)
    kwargs = generation_kwargs(params, tokenizer)
    kwargs.update(streamer=streamer, stopping_criteria=_cancel_criteria(cancel))

    def work() -> None:
        import torch

        try:
            with backend._run_lock, torch.inference_mode(), backend._adapter_context(adapter):
                if params.get("seed") is not None:
                    torch.manual_seed(int(params["seed"]))
                backend.model.generate(**batch.to(backend.device), **kwargs)
        except BaseException as exc:  # surfaced to the consumer below
            failure.append(exc)
            streamer.end()

    threading.Thread(target=work, name="persllm-stream", daemon=True).start()
    stops = stop_list(params.get("stop"))
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    pieces = iter(streamer)
    try:
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            text += piece
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                if cut > sent:
                    yield text[sent:cut]
                return
            if len(text) - hold > sent:
                yield text[sent : len(text) - hold]
                sent = len(text) - hold
        if failure:
            raise failure[0]
        if len(text) > sent:
            yield text[sent:]
    finally:
        cancel.set()


def _cancel_criteria(cancel: threading.Event) -> Any:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> Any:
            return torch.full(
                (input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([Cancelled()])
