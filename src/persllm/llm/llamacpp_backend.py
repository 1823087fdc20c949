"""llama.cpp in-process through ``xllamacpp``: a GGUF file (``bundled:smollm2`` is one), no conversion.

The engine is llama.cpp's own server loop without the HTTP part: ``cfg.concurrency`` parallel slots
decoded together (continuous batching), the GGUF file's chat template, and grammar-constrained JSON
for a ``response_format`` JSON schema. Each call waits in a thread of the backend's own pool, so as
many calls as there are slots are decoded at once. xllamacpp is imported on first use.
"""

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from persllm.errors import UserError
from persllm.llm.base import Completion, LLMError, Message, merge_params, stop_list
from persllm.llm.bundled import SMOLLM2, smollm2_gguf
from persllm.llm.config import LLMConfig
from persllm.llm.transformers_backend import weights_fingerprint

GGUF_MAGIC = b"GGUF"
SLOT_CONTEXT = 2048  # tokens of context per parallel slot


def gguf_path(model: str) -> Path:
    """The GGUF file ``model`` names (``bundled:smollm2`` or a path); anything else is a UserError."""
    if model == SMOLLM2:
        return smollm2_gguf()
    path = Path(model).expanduser()
    if not path.is_file():
        raise UserError(
            f"model {model!r}: no such file; the llamacpp backend runs a local .gguf file "
            "(or bundled:smollm2); for a Hugging Face folder use backend: transformers"
        )
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise UserError(
                f"model {model!r}: {path.name} is not a GGUF file; give a .gguf file, or use "
                "backend: transformers for other formats"
            )
    return path


def request_body(messages: list[Message], params: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    """The OpenAI-style chat request llama.cpp takes, from a call's merged params (persllm's own keys,
    such as ``n_sample``, ``tag`` and ``adapter``, are never copied)."""
    body: dict[str, Any] = {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "max_tokens": int(params.get("max_tokens", 256)),
        "temperature": float(params.get("temperature", 1.0)),
        "stream": stream,
    }
    if params.get("top_p") is not None:
        body["top_p"] = float(params["top_p"])
    if params.get("seed") is not None:
        body["seed"] = int(params["seed"])
    stops = stop_list(params.get("stop"))
    if stops:
        body["stop"] = stops
    if params.get("response_format"):
        body["response_format"] = params["response_format"]
    return body


def completion_of(result: Any, seconds: float) -> Completion:
    """A Completion from llama.cpp's chat completion object; an error object is an LLMError."""
    if not isinstance(result, dict) or "choices" not in result:
        message = result.get("error", result) if isinstance(result, dict) else result
        if isinstance(message, dict):
            message = message.get("message", message)
        raise LLMError(f"llamacpp: the engine refused the request: {str(message)[:200]}")
    choice = result["choices"][0]
    usage = result.get("usage") or {}
    text = (choice.get("message") or {}).get("content") or ""
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    return Completion(
        text,
        finish,
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        seconds,
    )


class LlamaCppBackend:
    """A GGUF chat model run by llama.cpp in this process, ``cfg.concurrency`` sequences at a time."""

    name = "llamacpp"
    supports_json_schema = True

    def __init__(self, cfg: LLMConfig) -> None:
        if cfg.adapter:
            raise UserError(
                "adapter: the llamacpp backend runs one GGUF file without PEFT adapters; "
                "use backend: transformers for a LoRA adapter folder"
            )
        self.cfg = cfg
        self.model_id = cfg.model
        self.path = gguf_path(cfg.model)
        self.server: Any = None
        self._load_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="persllm-llamacpp")
        self._fingerprint: str | None = None

    def load(self) -> None:
        """Start the engine (done on first use; safe to repeat)."""
        with self._load_lock:
            if self.server is not None:
                return
            try:
                import xllamacpp
            except ImportError:
                raise UserError(
                    "backend llamacpp needs xllamacpp: pip install -r requirements.txt (or use "
                    "backend: transformers)"
                ) from None
            params = xllamacpp.CommonParams()
            params.model.path = str(self.path)
            params.n_parallel = self.cfg.concurrency
            params.n_ctx = SLOT_CONTEXT * self.cfg.concurrency
            threads = max(1, os.cpu_count() or 1)
            params.cpuparams.n_threads = threads
            params.cpuparams_batch.n_threads = threads
            params.warmup = False
            params.verbosity = -1
            try:
                self.server = xllamacpp.Server(params)
            except Exception as exc:  # the engine's own message says what it could not load
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(
                    f"model {self.cfg.model!r}: llama.cpp cannot load {self.path} ({first[:160]}); "
                    "check the file is a complete GGUF of an architecture llama.cpp supports"
                ) from None

    def cache_identity(self, params: dict[str, Any]) -> dict[str, Any]:
        """The weights a call uses: the GGUF file's size and modification time."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.path)
        return {"weights": self._fingerprint, "adapter": None}

    def _call(self, body: dict[str, Any]) -> Completion:
        self.load()
        started = time.perf_counter()
        result = self.server.handle_chat_completions(body)
        return completion_of(result, time.perf_counter() - started)

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion:
        merged = merge_params(self.cfg.params, params)
        body = request_body(messages, merged)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, body)

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]:
        """Yield the reply's text as llama.cpp produces it (stop strings are cut by the engine)."""
        merged = merge_params(self.cfg.params, params)
        body = request_body(messages, merged, stream=True)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def on_chunk(chunk: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        def work() -> None:
            try:
                self.load()
                self.server.handle_chat_completions(body, on_chunk)
            except BaseException as exc:  # surfaced to the consumer below
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        future = loop.run_in_executor(self._pool, work)
        try:
            while (chunk := await queue.get()) is not done:
                if isinstance(chunk, BaseException):
                    raise chunk
                if isinstance(chunk, dict) and "error" in chunk:
                    raise LLMError(f"llamacpp: the engine stopped the stream: {str(chunk['error'])[:200]}")
                for choice in chunk.get("choices", []) if isinstance(chunk, dict) else []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        finally:
            await asyncio.shield(future)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False)
        self.server = None
