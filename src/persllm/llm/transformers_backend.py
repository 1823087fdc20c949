"""An in-process Hugging Face chat model: a folder, a hub id, a ``.gguf`` file or ``bundled:smollm2``.

Concurrent ``generate()`` calls are gathered into left-padded batches of up to ``cfg.concurrency``
(one batch per identical sampling params and adapter) and run by ``model.generate`` in a worker
thread, one batch at a time. LoRA adapters: ``cfg.adapter`` is the default one; ``add_adapter(name,
path)`` loads more onto the same base, chosen per call with ``params["adapter"]`` (``"base"``: none).
torch and transformers are imported on first use, so importing this module stays cheap.
"""

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.errors import UserError
from persllm.hashing import canonical_json, file_hash, stable_hash
from persllm.llm.base import Completion, Message, merge_params, stop_list
from persllm.llm.bundled import resolve_model
from persllm.llm.config import LLMConfig

BASE = "base"
DEFAULT = "default"
NOT_SAMPLING = ("n_sample", "tag", "adapter", "response_format")
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class _Pending:
    messages: list[Message]
    params: dict[str, Any]
    adapter: str | None
    future: asyncio.Future[Completion]


class _Batcher:
    """The calls waiting on one event loop, and the task that drains them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[_Pending] = []
        self.task: asyncio.Task[None] | None = None


class TransformersBackend:
    """A local transformers chat model with optional LoRA adapters and batched generation."""

    name = "transformers"
    supports_json_schema = False

    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg
        self.model_id = cfg.model
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = ""
        self._adapters: dict[str, str] = {}
        self._loaded: set[str] = set()
        self._tokenizers: dict[str, Any] = {}
        self._fingerprints: dict[str, str] = {}
        self._run_lock = threading.Lock()  # one model.generate at a time (adapter switching is global)
        self._load_lock = threading.Lock()
        self._batcher: _Batcher | None = None
        if cfg.adapter:
            self._adapters[DEFAULT] = check_adapter(cfg.adapter, "adapter")

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the base model, tokenizer and registered adapters (done on first use; safe to repeat)."""
        with self._load_lock:
            if self.model is None:
                self._load_base()
            for name, path in self._adapters.items():
                if name not in self._loaded:
                    self._load_adapter(name, path)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register a LoRA adapter folder under ``name``; select it per call with ``params["adapter"]``."""
        if name == BASE:
            raise UserError(f"adapter name {BASE!r} is reserved (it means: no adapter); pick another name")
        with self._load_lock:
            self._adapters[name] = check_adapter(str(path), f"adapter {name!r}")
            self._loaded.discard(name)
            self._fingerprints.pop(str(path), None)
        if self.model is not None:
            self.load()

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(self.cfg.device)
        dtype = pick_dtype(self.cfg.dtype, self.device)
        source, kwargs = model_source(self.cfg.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"model {self.cfg.model!r}: cannot load ({str(exc).splitlines()[0][:160]}); give a model "
                "folder, a .gguf file, a hub id already downloaded, or bundled:smollm2"
            ) from None
        prepare_tokenizer(tokenizer)
        # An adapter trained with added tokens (the stage labels) ships its own, larger tokenizer.
        sizes = [len(self._adapter_tokenizer(path) or tokenizer) for path in self._adapters.values()]
        if max(sizes, default=0) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(max(sizes), mean_resizing=False)  # the adapter brings the rows
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    def _adapter_tokenizer(self, path: str) -> Any:
        if not (Path(path) / "tokenizer_config.json").exists():
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        prepare_tokenizer(tokenizer)
        return tokenizer

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        tokenizer = self._adapter_tokenizer(path)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if tokenizer is not None and len(tokenizer) > vocab:
            raise UserError(
                f"adapter {name!r} ({path}): its tokenizer has {len(tokenizer)} tokens but the loaded base "
                f"has {vocab}; register adapters with added tokens before the first generation"
            )
        with self._run_lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
        self._tokenizers[name] = tokenizer or self.tokenizer
        self._loaded.add(name)

    # ------------------------------------------------------------------ identity (cache keys)

    def adapter_name(self, params: dict[str, Any]) -> str | None:
        """The adapter a call uses: its ``adapter`` param, else the default one, else none."""
        name = params.get("adapter")
        if name is None:
            return DEFAULT if DEFAULT in self._adapters else None
        if name == BASE:
            return None
        if name not in self._adapters:
            known = ", ".join([BASE, *self.adapters])
            raise UserError(f"adapter {name!r} is not loaded; use one of: {known} (or add_adapter it first)")
        return str(name)

    def cache_identity(self, params: dict[str, Any]) -> dict[str, Any]:
        """The weights a call would use, so a retrained adapter or model never hits stale cache rows."""
        name = self.adapter_name(params)
        adapter = self._adapters[name] if name else None
        model = self.cfg.model
        local = not model.startswith("bundled:") and Path(model).exists()
        return {
            "weights": self._fingerprint(model) if local else None,
            "adapter": f"lora:{self._fingerprint(adapter)}" if adapter else None,
        }

    def _fingerprint(self, path: str) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = weights_fingerprint(Path(path))
        return self._fingerprints[path]

    # ------------------------------------------------------------------ generation

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion:
        merged = merge_params(self.cfg.params, params)
        adapter = self.adapter_name(merged)
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop:
            self._batcher = _Batcher(loop)
        batcher = self._batcher
        future: asyncio.Future[Completion] = loop.create_future()
        batcher.pending.append(_Pending(messages, merged, adapter, future))
        if batcher.task is None or batcher.task.done():
            batcher.task = loop.create_task(self._drain(batcher))
        return await future

    async def _drain(self, batcher: _Batcher) -> None:
        await asyncio.sleep(0)  # let calls started in the same tick join the first batch
        while batcher.pending:
            first = batcher.pending[0]
            group = _group_key(first)
            batch = [p for p in batcher.pending if _group_key(p) == group][: self.cfg.concurrency]
            batcher.pending = [p for p in batcher.pending if all(p is not b for b in batch)]
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(
                    self._run_rows, [p.messages for p in batch], first.params, first.adapter
                )
            except Exception as exc:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                for pending, result in zip(batch, results, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(result)

    def generate_batch(self, conversations: list[list[Message]], params: dict[str, Any]) -> list[Completion]:
        """Synchronous batched generation (evaluation): ``cfg.concurrency`` rows of similar length at once."""
        merged = merge_params(self.cfg.params, params)
        adapter = self.adapter_name(merged)
        order = sorted(range(len(conversations)), key=lambda i: len(canonical_json(conversations[i])))
        results: list[Completion | None] = [None] * len(conversations)
        size = self.cfg.concurrency
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            rows = self._run_rows([conversations[i] for i in chunk], merged, adapter)
            for i, completion in zip(chunk, rows, strict=True):
                results[i] = completion
        return [r for r in results if r is not None]

    def _run_rows(
        self, conversations: list[list[Message]], params: dict[str, Any], adapter: str | None
    ) -> list[Any]:
        import torch

        self.load()
        tokenizer = self._tokenizers.get(adapter or "", self.tokenizer)
        prompts = [render_prompt(tokenizer, messages) for messages in conversations]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        kwargs = generation_kwargs(params, tokenizer)
        with self._run_lock, torch.inference_mode(), self._adapter_context(adapter):
            if params.get("seed") is not None:
                torch.manual_seed(int(params["seed"]))
            started = time.perf_counter()
            output = self.model.generate(**batch, **kwargs)
            seconds = time.perf_counter() - started
        width = batch["input_ids"].shape[1]
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        return [
            decode_row(tokenizer, row[width:].tolist(), params, int(n), seconds, len(conversations))
            for row, n in zip(output, prompt_tokens, strict=True)
        ]

    def _adapter_context(self, adapter: str | None) -> Any:
        from contextlib import nullcontext

        if not hasattr(self.model, "disable_adapter"):
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return nullcontext()

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]:
        """Yield the reply's text as it is generated (TextIteratorStreamer in a thread)."""
        from persllm.llm.local_stream import stream_text

        merged = merge_params(self.cfg.params, params)
        adapter = self.adapter_name(merged)
        await asyncio.to_thread(self.load)
        tokenizer = self._tokenizers.get(adapter or "", self.tokenizer)
        async for piece in stream_text(self, tokenizer, messages, merged, adapter):
            yield piece

    async def aclose(self) -> None:
        return None


def _group_key(pending: _Pending) -> str:
    sampling = {k: v for k, v in pending.params.items() if k not in NOT_SAMPLING}
    return canonical_json([sampling, pending.adapter])


# ---------------------------------------------------------------------- plain helpers


def check_adapter(path: str, field: str) -> str:
    folder = Path(path)
    if (folder / "adapter_config.json").exists():
        return str(folder)
    if (folder / "config.json").exists():
        raise UserError(
            f"{field}: {path} holds full model weights, not a LoRA adapter; use it as model instead"
        )
    raise UserError(f"{field}: {path} has no adapter_config.json; point it at a folder saved by PEFT")


def model_source(model: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` arguments for a model name: a folder/hub id, or a GGUF file's folder + name."""
    resolved = resolve_model(model)
    if resolved.endswith(".gguf"):
        path = Path(resolved)
        if not path.is_file():
            raise UserError(f"model {model!r}: no such GGUF file; give the path of a local .gguf file")
        return str(path.parent), {"gguf_file": path.name}
    return resolved, {}


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def prepare_tokenizer(tokenizer: Any) -> None:
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    """The chat-templated prompt ending where the assistant's reply begins."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
    # A base model without a chat template: a plain transcript.
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "


def generation_kwargs(params: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``model.generate`` arguments from OpenAI-named params; temperature 0 means greedy."""
    temperature = float(params.get("temperature", 1.0))
    kwargs: dict[str, Any] = {
        "max_new_tokens": int(params.get("max_tokens", 256)),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=float(params.get("top_p", 1.0)))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    stops = stop_list(params.get("stop"))
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=tokenizer)
    return kwargs


def decode_row(
    tokenizer: Any, ids: list[int], params: dict[str, Any], prompt_tokens: int, seconds: float, batch: int
) -> Completion:
    """One generated row as a Completion: cut at end-of-text or padding, then at the first stop string."""
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ends.update(
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.vocab
    )
    ends.discard(None)
    length = next((i for i, token in enumerate(ids) if token in ends), None)
    finished = length is not None
    ids = ids if length is None else ids[:length]
    text, stopped = cut_at_stop(
        tokenizer.decode(ids, skip_special_tokens=True), stop_list(params.get("stop"))
    )
    hit_limit = not finished and len(ids) >= int(params.get("max_tokens", 256))
    finish = "length" if hit_limit and not stopped else "stop"
    return Completion(text, finish, prompt_tokens, len(ids), seconds, extra={"batch_size": batch})


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    positions = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def weights_fingerprint(path: Path) -> str:
    """Content hash of an adapter's weights, or the sizes and mtimes of a big model's files."""
    adapter = sorted(path.glob("adapter_model.*")) if path.is_dir() else []
    if adapter:
        return file_hash(adapter[0])
    files = [path] if path.is_file() else sorted(path.iterdir())
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".json", ".gguf")]
    return stable_hash([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights])
