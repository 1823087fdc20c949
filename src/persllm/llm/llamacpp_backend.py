"""llama.cpp in-process through ``xllamacpp``: a GGUF file (``bundled:smollm2`` is one), no conversion.

The engine is llama.cpp's own server loop without the HTTP part: ``cfg.concurrency`` parallel slots
decoded together (continuous batching), the GGUF file's chat template, and grammar-constrained JSON
for a ``response_format`` JSON schema. Each call waits in a thread of the backend's own pool, so as
many calls as there are slots are decoded at once. xllamacpp is imported on first use.

LoRA adapters are GGUF adapter files (``persllm export --gguf DIR`` writes them): ``cfg.adapter`` is
the default one and ``add_adapter(name, path)`` adds more. All of them load with the engine at scale 0,
and each call switches on the one it names (``params["adapter"]``; ``"base"``: none) through the
request's ``lora`` field, so one base file serves every persona.
"""

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from persllm.bundled import SMOLLM2, smollm2_gguf
from persllm.config.llm import LLMConfig
from persllm.errors import UserError
from persllm.llm.base import (
    BASE_ADAPTER,
    DEFAULT_ADAPTER,
    Completion,
    LLMError,
    Message,
    merge_params,
    pick_adapter,
    stop_list,
)
from persllm.llm.transformers_backend import weights_fingerprint

GGUF_MAGIC = b"GGUF"
SLOT_CONTEXT = 2048  # tokens of context per parallel slot
BASE = BASE_ADAPTER
DEFAULT = DEFAULT_ADAPTER


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


def lora_adapter_path(path: str, field: str) -> Path:
    """``path`` if it is a llama.cpp LoRA adapter (a GGUF file of type ``adapter``), else a UserError."""
    import gguf

    file = Path(path).expanduser()
    if (file / "adapter_config.json").exists():
        raise UserError(
            f"{field}: {path} is a PEFT adapter folder; the llamacpp backend loads GGUF adapters: "
            "write them with persllm export CONFIG --gguf DIR"
        )
    if not file.is_file() or file.read_bytes()[:4] != GGUF_MAGIC:
        raise UserError(
            f"{field}: {path} is not a GGUF file; give a LoRA adapter written by persllm export --gguf"
        )
    kind = gguf.GGUFReader(str(file)).fields.get("general.type")
    if kind is None or bytes(kind.parts[-1]).decode() != "adapter":
        raise UserError(f"{field}: {path} is a GGUF model, not a LoRA adapter; use it as model instead")
    return file


def lora_field(names: list[str], chosen: str | None) -> list[dict[str, Any]]:
    """llama.cpp's per-request ``lora`` list: the ``chosen`` adapter at scale 1, every other one at 0."""
    return [{"id": index, "scale": 1.0 if name == chosen else 0.0} for index, name in enumerate(names)]


def request_body(
    messages: list[Message],
    params: dict[str, Any],
    stream: bool = False,
    lora: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The OpenAI-style chat request llama.cpp takes, from a call's merged params (persllm's own keys,
    such as ``n_sample``, ``tag`` and ``adapter``, are never copied; ``lora`` is llama.cpp's field)."""
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
    if params.get("logprobs"):
        body["logprobs"] = True
        body["top_logprobs"] = max(1, int(params.get("top_logprobs") or 0))  # 0 would return no logprobs
    if lora:
        body["lora"] = lora
    return body


def completion_of(result: Any, seconds: float, top_logprobs: int = 0) -> Completion:
    """A Completion from llama.cpp's chat completion object; an error object is an LLMError.

    Its token log-probabilities (``extra["logprobs"]``) keep ``top_logprobs`` alternatives each."""
    if not isinstance(result, dict) or "choices" not in result:
        message = result.get("error", result) if isinstance(result, dict) else result
        if isinstance(message, dict):
            message = message.get("message", message)
        raise LLMError(f"llamacpp: the engine refused the request: {str(message)[:200]}")
    choice = result["choices"][0]
    usage = result.get("usage") or {}
    text = (choice.get("message") or {}).get("content") or ""
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    logprobs = (choice.get("logprobs") or {}).get("content")
    for item in logprobs or []:
        item.pop("id", None)
        item["top_logprobs"] = [
            {k: v for k, v in alt.items() if k != "id"} for alt in item.get("top_logprobs", [])[:top_logprobs]
        ]
    return Completion(
        text,
        finish,
        int(usage.get("prompt_tokens", 0)),
        int(usage.get("completion_tokens", 0)),
        seconds,
        extra={"logprobs": logprobs} if logprobs is not None else {},
    )


class LlamaCppBackend:
    """A GGUF chat model run by llama.cpp in this process, ``cfg.concurrency`` sequences at a time."""

    name = "llamacpp"
    supports_json_schema = True
    supports_logprobs = True

    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg
        self.model_id = cfg.model
        self.path = gguf_path(cfg.model)
        self.server: Any = None
        self._adapters: dict[str, Path] = {}
        if cfg.adapter:
            self._adapters[DEFAULT] = lora_adapter_path(cfg.adapter, "adapter")
        self._load_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="persllm-llamacpp")
        self._fingerprints: dict[Path, str] = {}

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register a GGUF LoRA adapter under ``name``; a running engine restarts to load it."""
        if name == BASE:
            raise UserError(f"adapter name {BASE!r} is reserved (it means: no adapter); pick another name")
        file = lora_adapter_path(str(path), f"adapter {name!r}")
        with self._load_lock:
            if self._adapters.get(name) == file:
                return
            self._adapters[name] = file
            self._fingerprints.pop(file, None)
            self.server = None  # the engine loads its adapters when it starts

    def adapter_name(self, params: dict[str, Any]) -> str | None:
        """The adapter a call uses: its ``adapter`` param, else the default one, else none."""
        return pick_adapter(params, list(self._adapters))

    def _lora(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return lora_field(list(self._adapters), self.adapter_name(params)) if self._adapters else []

    def load(self) -> Any:
        """Start the engine (done on first use; safe to repeat); returns it."""
        with self._load_lock:
            if self.server is not None:
                return self.server
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
            if self._adapters:
                params.lora_adapters = [
                    xllamacpp.CommonAdapterLoraInfo(str(p), 0.0) for p in self._adapters.values()
                ]
                params.lora_init_without_apply = True
                params.cache_ram_mib = 0  # a cached prompt's KV must never cross from one adapter to another
            try:
                self.server = xllamacpp.Server(params)
            except Exception as exc:  # the engine's own message says what it could not load
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(
                    f"model {self.cfg.model!r}: llama.cpp cannot load {self.path} ({first[:160]}); "
                    "check the file is a complete GGUF of an architecture llama.cpp supports, and that each "
                    "adapter was exported for this base model"
                ) from None
            return self.server

    def cache_identity(self, params: dict[str, Any]) -> dict[str, Any]:
        """The weights a call uses: the GGUF files' sizes and modification times."""
        name = self.adapter_name(params)
        adapter = self._adapters[name] if name else None
        return {
            "weights": self._fingerprint(self.path),
            "adapter": f"gguf-lora:{self._fingerprint(adapter)}" if adapter else None,
        }

    def _fingerprint(self, path: Path) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = weights_fingerprint(path)
        return self._fingerprints[path]

    def _call(self, body: dict[str, Any], top_logprobs: int = 0) -> Completion:
        server = self.load()
        started = time.perf_counter()
        result = server.handle_chat_completions(body)
        return completion_of(result, time.perf_counter() - started, top_logprobs)

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion:
        merged = merge_params(self.cfg.params, params)
        body = request_body(messages, merged, lora=self._lora(merged))
        loop = asyncio.get_running_loop()
        top = int(merged.get("top_logprobs") or 0)
        return await loop.run_in_executor(self._pool, self._call, body, top)

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]:
        """Yield the reply's text as llama.cpp produces it (stop strings are cut by the engine)."""
        merged = merge_params(self.cfg.params, params)
        body = request_body(messages, merged, stream=True, lora=self._lora(merged))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()

        def on_chunk(chunk: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        def work() -> None:
            try:
                self.load().handle_chat_completions(body, on_chunk)
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
