"""An in-process Hugging Face chat model: a folder, a hub id, a ``.gguf`` file or ``bundled:smollm2``.

Concurrent ``generate()`` and ``stream()`` calls are gathered into the same left-padded batches of up
to ``cfg.concurrency`` (one batch per identical sampling params and adapter) and run by
``model.generate`` in a worker thread, one batch at a time; streamed rows get their text as each step
is decoded (``local_stream``). A row whose caller has gone stops generating, and so does a row that has
produced a stop string (checked on the decoded tail of each row, with no per-request set-up cost).

LoRA adapters: ``cfg.adapter`` is the default one; ``add_adapter(name, path)`` loads more onto the same
base, chosen per call with ``params["adapter"]`` (``"base"``: none).
An adapter that saves whole modules (``modules_to_save``: the embeddings of new stage tokens) is never
pooled: PEFT does not switch saved, tied modules per adapter, so it gets a base model of its own.
torch and transformers are imported on first use, so importing this module stays cheap.
"""

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.bundled import resolve_model
from persllm.config.llm import LLMConfig
from persllm.errors import UserError
from persllm.hashing import canonical_json, file_hash, stable_hash
from persllm.interrupts import stop_requested
from persllm.llm.base import (
    BASE_ADAPTER,
    DEFAULT_ADAPTER,
    Completion,
    Message,
    merge_params,
    pick_adapter,
    stop_list,
)
from persllm.llm.local_stream import BatchStreamer, RowSink, read_sink

BASE = BASE_ADAPTER
DEFAULT = DEFAULT_ADAPTER
NOT_SAMPLING = ("n_sample", "tag", "adapter", "response_format")  # logprobs rows are a batch of their own
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


@dataclass
class _Pending:
    """One call waiting for a batch: a plain one resolves ``future``, a streamed one feeds ``sink``."""

    messages: list[Message]
    params: dict[str, Any]
    adapter: str | None
    future: asyncio.Future[Completion] | None = None
    sink: "RowSink | None" = None

    @property
    def gone(self) -> bool:
        """Nobody waits for this row any more (read from the generating thread too)."""
        if self.sink is not None:
            return self.sink.gone
        return self.future is None or self.future.done()


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
    supports_logprobs = True

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
        self._isolated: dict[str, TransformersBackend] = {}  # adapters on a base model of their own
        self._run_lock = threading.Lock()  # one model.generate at a time (adapter switching is global)
        self._load_lock = threading.Lock()
        self._batcher: _Batcher | None = None
        self.shared_prefix_min = SHARED_PREFIX_MIN  # tokens every row of a batch must share to run them once
        if cfg.adapter:
            self._adapters[DEFAULT] = check_adapter(cfg.adapter, "adapter")

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the base model, tokenizer and registered adapters (done on first use; safe to repeat)."""
        with self._load_lock:
            if self.model is None:
                self._load_base()
            for name, path in self._adapters.items():
                if name in self._isolated:
                    self._isolated[name].load()
                elif name not in self._loaded:
                    self._load_adapter(name, path)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register a LoRA adapter folder under ``name``; select it per call with ``params["adapter"]``."""
        if name == BASE:
            raise UserError(f"adapter name {BASE!r} is reserved (it means: no adapter); pick another name")
        folder = check_adapter(str(path), f"adapter {name!r}")
        with self._load_lock:
            self._adapters[name] = folder
            self._loaded.discard(name)
            self._fingerprints.pop(folder, None)
            previous = self._isolated.pop(name, None)
            default = self._adapters.get(DEFAULT)
            if saves_modules(folder) or (default is not None and saves_modules(default)):
                self._isolated[name] = TransformersBackend(self.cfg.model_copy(update={"adapter": folder}))
        if previous is not None:
            previous.release()
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
        # A default adapter trained with new tokens ships its own, larger tokenizer and brings the rows.
        default = self._adapters.get(DEFAULT)
        size = len(self._adapter_tokenizer(default) or tokenizer) if default and saves_modules(default) else 0
        if size > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(size, mean_resizing=False)
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
                f"adapter {name!r} ({path}): its tokenizer has {len(tokenizer)} tokens but the base model "
                f"{self.cfg.model} has {vocab}; load it with the base model it was trained on"
            )
        with self._run_lock:
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(path, adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as exc:
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                raise UserError(
                    f"adapter {name!r} ({path}): does not fit the base model {self.cfg.model} ({first}); "
                    "load it with the base model it was trained on"
                ) from None
            self.model.eval()
        self._tokenizers[name] = tokenizer or self.tokenizer
        self._loaded.add(name)

    # ------------------------------------------------------------------ identity (cache keys)

    def adapter_name(self, params: dict[str, Any]) -> str | None:
        """The adapter a call uses: its ``adapter`` param, else the default one, else none."""
        return pick_adapter(params, list(self._adapters))

    def cache_identity(self, params: dict[str, Any]) -> dict[str, Any]:
        """The weights a call would use, so a retrained adapter or model never hits stale cache rows."""
        name = self.adapter_name(params)
        adapter = self._adapters[name] if name else None
        model = self.cfg.model
        local = not model.startswith("bundled:") and Path(model).exists()
        # float32 rows keep their old keys; another dtype answers a little differently.
        dtype = pick_dtype(self.cfg.dtype, self.device or pick_device(self.cfg.device))
        parts = [self._fingerprint(model) if local else "", "" if dtype == "float32" else dtype]
        weights = ":".join(part for part in parts if part)
        return {
            "weights": weights or None,
            "adapter": f"lora:{self._fingerprint(adapter)}" if adapter else None,
        }

    def _fingerprint(self, path: str) -> str:
        if path not in self._fingerprints:
            self._fingerprints[path] = weights_fingerprint(Path(path))
        return self._fingerprints[path]

    # ------------------------------------------------------------------ generation

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion:
        merged = merge_params(self.cfg.params, params)
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(messages, merged, self.adapter_name(merged), future=future))
        return await future

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]:
        """Yield the reply's text as it is generated, in the same batches as ``generate``."""

        merged = merge_params(self.cfg.params, params)
        sink = RowSink(asyncio.get_running_loop())
        self._enqueue(_Pending(messages, merged, self.adapter_name(merged), sink=sink))
        async for piece in read_sink(sink, stop_list(merged.get("stop"))):
            yield piece

    def _enqueue(self, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.loop is not loop:
            self._batcher = _Batcher(loop)
        batcher = self._batcher
        batcher.pending.append(pending)
        if batcher.task is None or batcher.task.done():
            batcher.task = loop.create_task(self._drain(batcher))

    async def _drain(self, batcher: _Batcher) -> None:
        await asyncio.sleep(0)  # let calls started in the same tick join the first batch
        while batcher.pending:
            first = batcher.pending[0]
            group = _group_key(first)
            batch = [p for p in batcher.pending if _group_key(p) == group][: self.cfg.concurrency]
            batcher.pending = [p for p in batcher.pending if all(p is not b for b in batch)]
            batch = [p for p in batch if not p.gone]
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(
                    self._run_rows, [p.messages for p in batch], first.params, first.adapter, batch
                )
            except Exception as exc:
                for pending in batch:
                    _fail(pending, exc)
            else:
                for pending, result in zip(batch, results, strict=True):
                    _finish(pending, result)

    def generate_batch(self, conversations: list[list[Message]], params: dict[str, Any]) -> list[Completion]:
        """Synchronous batched generation (evaluation): ``cfg.concurrency`` rows of similar length at once."""
        merged = merge_params(self.cfg.params, params)
        adapter = self.adapter_name(merged)
        # Rows with the same first message (a system prompt) together, so a batch runs it once; then by
        # length, so little padding.
        order = sorted(
            range(len(conversations)),
            key=lambda i: (canonical_json(conversations[i][:1]), len(canonical_json(conversations[i]))),
        )
        results: list[Completion | None] = [None] * len(conversations)
        size = self.cfg.concurrency
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            rows = self._run_rows([conversations[i] for i in chunk], merged, adapter)
            for i, completion in zip(chunk, rows, strict=True):
                results[i] = completion
        return [r for r in results if r is not None]

    def _run_rows(
        self,
        conversations: list[list[Message]],
        params: dict[str, Any],
        adapter: str | None,
        callers: Sequence[_Pending] = (),
    ) -> list[Any]:
        """One ``model.generate`` over ``conversations``; with ``callers`` (one per row), streamed rows
        get their text as it is made and rows whose caller has gone stop."""
        import torch

        if adapter in self._isolated:
            return self._isolated[adapter]._run_rows(conversations, params, DEFAULT, callers)
        self.load()
        tokenizer = self._tokenizers.get(adapter or "", self.tokenizer)
        prompts = [render_prompt(tokenizer, messages) for messages in conversations]
        ids = [list(row) for row in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        shared = common_prefix(ids)
        cache = None
        if shared >= self.shared_prefix_min and len(ids) > 1:
            # The rows' common beginning (a system prompt) runs once; its key/value cache is copied to every
            # row and generate() runs only the rest: [beginning][padding][own tokens], padding masked out.
            with self._run_lock, torch.inference_mode(), self._adapter_context(adapter):
                cache = self.model(
                    input_ids=torch.tensor([ids[0][:shared]], device=self.device)
                ).past_key_values
            cache.batch_repeat_interleave(len(ids))
            batch = middle_padded(ids, shared, int(tokenizer.pad_token_id or 0), self.device)
        else:
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                self.device
            )
        kwargs = generation_kwargs(params, tokenizer)
        if cache is not None:
            kwargs["past_key_values"] = cache
        width = batch["input_ids"].shape[1]
        kwargs.update(row_stopping(tokenizer, stop_list(params.get("stop")), width, callers))
        if any(caller.sink is not None for caller in callers):
            sinks = [caller.sink for caller in callers]
            kwargs["streamer"] = BatchStreamer(tokenizer, sinks, end_ids(tokenizer))
        want_logprobs = bool(params.get("logprobs"))
        if want_logprobs:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        with self._run_lock, torch.inference_mode(), self._adapter_context(adapter):
            if params.get("seed") is not None:
                torch.manual_seed(int(params["seed"]))
            started = time.perf_counter()
            output = self.model.generate(**batch, **kwargs)
            seconds = time.perf_counter() - started
        sequences = output.sequences if want_logprobs else output
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        rows = [
            decode_row(tokenizer, row[width:].tolist(), params, int(n), seconds, len(conversations))
            for row, n in zip(sequences, prompt_tokens, strict=True)
        ]
        if want_logprobs:
            top = int(params.get("top_logprobs") or 0)
            for index, completion in enumerate(rows):
                ids = sequences[index, width : width + completion.completion_tokens].tolist()
                steps = [step[index] for step in output.logits[: len(ids)]]
                completion.extra["logprobs"] = token_logprobs(tokenizer, ids, steps, top)
        return rows

    def _adapter_context(self, adapter: str | None) -> Any:
        from contextlib import nullcontext

        if not hasattr(self.model, "disable_adapter"):
            return nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return nullcontext()

    # ------------------------------------------------------------------ scoring

    def reply_logits(
        self, conversations: list[list[Message]], replies: list[str], params: dict[str, Any]
    ) -> list[Any]:
        """For each conversation, the logits that predict each token of its ``reply`` (the assistant's
        next turn): a float32 tensor [reply tokens, vocabulary] per row, on the CPU.

        ``params["adapter"]`` picks the weights as for ``generate``. Rows run in right-padded batches of
        ``cfg.concurrency``.
        """
        adapter = self.adapter_name(merge_params(self.cfg.params, params))
        if adapter in self._isolated:
            return self._isolated[adapter].reply_logits(conversations, replies, {"adapter": DEFAULT})
        out: list[Any] = [None] * len(conversations)
        for index, logits in self._reply_batches(conversations, replies, adapter):
            out[index] = logits
        return out

    def reply_logprobs(
        self,
        conversations: list[list[Message]],
        replies: list[str],
        params: dict[str, Any],
        max_reply_tokens: int | None = None,
    ) -> list[list[float]]:
        """For each conversation, the log-probability of each token of its ``reply`` (at most the first
        ``max_reply_tokens``).

        Prompts that begin alike (the same system prompt, other questions; one question, several candidate
        replies) share that beginning: it runs once, and each row runs only the rest of its prompt and its
        reply on top of the beginning's key/value cache. Only one batch's logits are held at a time.
        """
        import copy

        import torch

        adapter = self.adapter_name(merge_params(self.cfg.params, params))
        if adapter in self._isolated:
            return self._isolated[adapter].reply_logprobs(
                conversations, replies, {"adapter": DEFAULT}, max_reply_tokens
            )
        self.load()
        tokenizer = self._tokenizers.get(adapter or "", self.tokenizer)
        prompts: list[list[int]] = []
        targets: list[list[int]] = []
        for messages, reply in zip(conversations, replies, strict=True):
            prompt, target = reply_ids(tokenizer, messages, reply)
            prompts.append(prompt)
            targets.append(target[:max_reply_tokens] if max_reply_tokens is not None else target)
        pad = int(tokenizer.pad_token_id or 0)
        out: list[list[float]] = [[] for _ in conversations]
        for shared, members in shared_prefixes(prompts):
            # Rows of like length batch together: less padding.
            rows = sorted((i for i in members if targets[i]), key=lambda i: len(prompts[i]) + len(targets[i]))
            if not rows:
                continue
            head = None
            if shared:
                with self._run_lock, torch.inference_mode(), self._adapter_context(adapter):
                    head = self.model(
                        input_ids=torch.tensor([prompts[rows[0]][:shared]], device=self.device),
                        use_cache=True,
                    ).past_key_values
            for start in range(0, len(rows), self.cfg.concurrency):
                chunk = rows[start : start + self.cfg.concurrency]
                tails = [prompts[i][shared:] + targets[i][:-1] for i in chunk]
                width = max(len(tail) for tail in tails)
                body = torch.full((len(chunk), width), pad, dtype=torch.long)
                for j, tail in enumerate(tails):
                    body[j, : len(tail)] = torch.tensor(tail)
                cache = copy.deepcopy(head)
                if cache is not None:
                    cache.batch_repeat_interleave(len(chunk))
                with self._run_lock, torch.inference_mode(), self._adapter_context(adapter):
                    logits = self.model(
                        input_ids=body.to(self.device),
                        past_key_values=cache,
                        position_ids=torch.arange(shared, shared + width)
                        .expand(len(chunk), -1)
                        .to(self.device),
                        attention_mask=torch.ones(
                            (len(chunk), shared + width), dtype=torch.long, device=self.device
                        ),
                    ).logits
                for j, i in enumerate(chunk):
                    first = len(prompts[i]) - shared - 1  # the position that predicts the reply's first token
                    rows_logits = logits[j, first : first + len(targets[i])].float()
                    picked = torch.log_softmax(rows_logits, dim=-1)[
                        torch.arange(len(targets[i])), torch.tensor(targets[i])
                    ]
                    out[i] = picked.cpu().tolist()
                del logits, cache
        return out

    def _reply_batches(
        self, conversations: list[list[Message]], replies: list[str], adapter: str | None
    ) -> Iterator[tuple[int, Any]]:
        """(row index, its reply logits [reply tokens, vocabulary] float32 on the CPU), one right-padded
        batch of ``cfg.concurrency`` rows of similar length at a time."""
        import torch

        self.load()
        tokenizer = self._tokenizers.get(adapter or "", self.tokenizer)
        rows = [reply_ids(tokenizer, m, r) for m, r in zip(conversations, replies, strict=True)]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        pad = int(tokenizer.pad_token_id or 0)
        for start in range(0, len(order), self.cfg.concurrency):
            chunk = order[start : start + self.cfg.concurrency]
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, i in enumerate(chunk):
                row = rows[i][0] + rows[i][1]
                ids[j, : len(row)] = torch.tensor(row)
                mask[j, : len(row)] = 1
            with self._run_lock, torch.inference_mode(), self._adapter_context(adapter):
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for j, i in enumerate(chunk):
                prompt, reply = len(rows[i][0]), len(rows[i][1])
                yield i, logits[j, prompt - 1 : prompt + reply - 1].float().cpu()
            del logits

    def release(self) -> None:
        """Drop the loaded weights (the backend loads again on next use)."""
        with self._load_lock:
            for backend in self._isolated.values():
                backend.release()
            self.model, self._loaded = None, set()

    async def aclose(self) -> None:
        for backend in self._isolated.values():
            await backend.aclose()


def _group_key(pending: _Pending) -> str:
    sampling = {k: v for k, v in pending.params.items() if k not in NOT_SAMPLING}
    return canonical_json([sampling, pending.adapter])


def _finish(pending: _Pending, result: Completion) -> None:
    if pending.sink is not None:
        pending.sink.close()  # normally closed already, when its row ended
    elif pending.future is not None and not pending.future.done():
        pending.future.set_result(result)


def _fail(pending: _Pending, error: Exception) -> None:
    if pending.sink is not None:
        pending.sink.close(error)
    elif pending.future is not None and not pending.future.done():
        pending.future.set_exception(error)


def row_stopping(
    tokenizer: Any, stops: list[str], prompt_width: int, callers: Sequence[_Pending]
) -> dict[str, Any]:
    """``model.generate``'s ``stopping_criteria`` that end single rows of a batch: a row whose generated
    text holds one of ``stops``, and a row whose caller has gone. The batch ends when every row has, or
    at once when the process is asked to stop (Ctrl-C, SIGTERM: a worker thread gets no KeyboardInterrupt).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    # A byte-level token can be a quarter of a character: this many tokens hold the longest stop string.
    window = 4 * max((len(s) for s in stops), default=0) + 1

    class StopStringSeen(StoppingCriteria):
        # transformers' own stop_strings precompute a table over the whole vocabulary for every new
        # set of strings (seconds per request on a 50k vocabulary); decoding each row's tail is cheap.
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> Any:
            tails = input_ids[:, prompt_width:][:, -window:].tolist()
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            seen = [any(stop in text for stop in stops) for text in texts]
            return torch.tensor(seen, dtype=torch.bool, device=input_ids.device)

    class CallerGone(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> Any:
            gone = [caller.gone for caller in callers]
            return torch.tensor(gone, dtype=torch.bool, device=input_ids.device)

    class ProcessStopping(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> Any:
            return torch.full(
                (input_ids.shape[0],), stop_requested(), dtype=torch.bool, device=input_ids.device
            )

    criteria = [
        ProcessStopping(),
        *([StopStringSeen()] if stops else []),
        *([CallerGone()] if callers else []),
    ]
    return {"stopping_criteria": StoppingCriteriaList(criteria)}


# ---------------------------------------------------------------------- plain helpers


SHARED_PREFIX_MIN = 32


def common_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one token of its own."""
    if not rows:
        return 0
    limit = min(len(row) for row in rows) - 1
    first, shared = rows[0], 0
    while shared < limit and all(row[shared] == first[shared] for row in rows):
        shared += 1
    return max(shared, 0)


def middle_padded(rows: list[list[int]], shared: int, pad: int, device: str) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` for rows that share ``shared`` leading tokens: each row is the
    shared part, then padding, then its own tokens, so every row ends at the right edge as generation
    needs; the padding is masked out (positions come from the mask, so the own tokens keep theirs)."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        own = row[shared:]
        input_ids[index, :shared] = torch.tensor(row[:shared])
        input_ids[index, width - len(own) :] = torch.tensor(own)
        mask[index, :shared] = 1
        mask[index, width - len(own) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def shared_prefixes(prompts: list[list[int]], minimum: int = 16) -> list[tuple[int, list[int]]]:
    """Rows grouped by a common beginning: ``(tokens shared, row indices)``. Prompts are sorted so alike
    ones sit together; a row joins the group before it when that saves work: the tokens it would share
    (at least ``minimum``) outweigh the tokens every member would then run again because the shared part
    shrinks. Every row keeps at least one token of its own (the position that predicts its reply's
    first token)."""
    groups: list[tuple[int, list[int]]] = []
    for index in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        prompt = prompts[index]
        if groups:
            shared, members = groups[-1]
            common = min(shared, common_prefix([prompts[members[0]], prompt]))
            if common >= minimum and common >= (shared - common) * len(members):
                groups[-1] = (common, [*members, index])
                continue
        groups.append((max(len(prompt) - 1, 0), [index]))
    return groups


def reply_ids(tokenizer: Any, messages: list[Message], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the chat-templated prompt up to the assistant turn, then ``reply``."""
    prompt = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    return list(prompt), list(tokenizer(reply, add_special_tokens=False)["input_ids"])


def saves_modules(folder: str) -> bool:
    """Whether an adapter carries more than LoRA pairs: whole modules (``modules_to_save``, the embeddings
    of new tokens), trainable token rows, or embedding copies saved beside the LoRA weights."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        return True
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.exists():
        return False
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return any(".lora_" not in name for name in handle.keys())  # noqa: SIM118  (not a dict)


def check_adapter(path: str, field: str) -> str:
    """``path`` if it is a PEFT LoRA adapter folder; otherwise a UserError saying what it is instead."""
    folder = Path(path)
    config_path = folder / "adapter_config.json"
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{field}: {config_path} is not valid JSON; save the adapter again") from None
        kind = config.get("peft_type") if isinstance(config, dict) else None
        if kind != "LORA":
            raise UserError(
                f"{field}: {config_path}: peft_type is {kind!r}, not 'LORA'; give a LoRA adapter folder"
            )
        if not any(folder.glob("adapter_model.*")):
            raise UserError(f"{field}: {path} has no adapter_model.safetensors; save the adapter again")
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
    return kwargs


def decode_row(
    tokenizer: Any, ids: list[int], params: dict[str, Any], prompt_tokens: int, seconds: float, batch: int
) -> Completion:
    """One generated row as a Completion: cut at end-of-text or padding, then at the first stop string."""
    ends = end_ids(tokenizer)
    length = next((i for i, token in enumerate(ids) if token in ends), None)
    finished = length is not None
    ids = ids if length is None else ids[:length]
    text, stopped = cut_at_stop(
        tokenizer.decode(ids, skip_special_tokens=True), stop_list(params.get("stop"))
    )
    hit_limit = not finished and len(ids) >= int(params.get("max_tokens", 256))
    finish = "length" if hit_limit and not stopped else "stop"
    return Completion(text, finish, prompt_tokens, len(ids), seconds, extra={"batch_size": batch})


def end_ids(tokenizer: Any) -> set[int]:
    """Tokens after which a generated row holds nothing more: end of text, and padding."""
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    ends.update(
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.vocab
    )
    ends.discard(None)
    return {int(token) for token in ends}


def token_logprobs(tokenizer: Any, ids: list[int], steps: list[Any], top: int) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content``: each generated token with its log-probability under the model (the
    raw distribution, before temperature or top-p) and the ``top`` most likely tokens at that step."""
    import torch

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, logits in zip(ids, steps, strict=True):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        item = entry(token_id, float(logprobs[token_id]))
        best = torch.topk(logprobs, top) if top else None
        item["top_logprobs"] = (
            [entry(int(i), float(v)) for v, i in zip(best.values, best.indices, strict=True)] if best else []
        )
        content.append(item)
    return content


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
