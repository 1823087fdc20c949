"""The transformers backend on a real tiny Llama (and SmolLM2, marked slow)."""

import asyncio
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import torch

from persllm.errors import UserError
from persllm.llm import CallCache, LLMConfig, TransformersBackend, make_backend, run_sync
from persllm.llm.transformers_backend import cut_at_stop, generation_kwargs, pick_dtype

QUESTIONS = ["Who keeps the light?", "What do you teach?", "Is the sea kind?", "hello who are you"]
GREEDY = {"temperature": 0.0, "max_tokens": 24}


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def local(model: Path | str, **fields: Any) -> TransformersBackend:
    fields.setdefault("params", GREEDY)
    return TransformersBackend(LLMConfig(model=str(model), **fields))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> TransformersBackend:
    backend = local(tiny_model_dir, concurrency=4)
    backend.load()
    return backend


def make_adapter(base: Path, target: Path, seed: int) -> Path:
    """A real PEFT LoRA adapter on the tiny model with randomised (non-zero) B matrices."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft.save_pretrained(target)
    return target


def test_generates_with_counts_and_timing(tiny: TransformersBackend) -> None:
    done = run_sync(tiny.generate(chat("Who keeps the light?"), {}))
    assert done.text == "I keep the light at Skerrow Point."
    assert done.finish_reason == "stop"
    assert done.prompt_tokens > 5 and done.completion_tokens > 5 and done.seconds > 0
    assert not tiny.supports_json_schema and tiny.device == "cpu"
    assert next(tiny.model.parameters()).dtype == torch.float32


def test_max_tokens_gives_length(tiny: TransformersBackend) -> None:
    done = run_sync(tiny.generate(chat("Who keeps the light?"), {"max_tokens": 3}))
    assert (done.finish_reason, done.completion_tokens) == ("length", 3)
    assert done.text and "Skerrow" not in done.text


def test_concurrent_calls_are_batched_and_match_one_by_one(tiny: TransformersBackend) -> None:
    alone = [run_sync(tiny.generate(chat(q), {})) for q in QUESTIONS]

    async def together() -> list[Any]:
        return await asyncio.gather(*[tiny.generate(chat(q), {}) for q in QUESTIONS])

    batched = run_sync(together())
    assert [c.extra["batch_size"] for c in alone] == [1, 1, 1, 1]
    assert [c.extra["batch_size"] for c in batched] == [4, 4, 4, 4]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in alone]
    # The sync batch API (evaluation): batches of cfg.concurrency, results in input order.
    tiny.cfg.concurrency = 3
    try:
        assert [c.text for c in tiny.generate_batch([chat(q) for q in QUESTIONS], {})] == [
            c.text for c in alone
        ]
    finally:
        tiny.cfg.concurrency = 4


def test_different_params_go_to_different_batches(tiny: TransformersBackend) -> None:
    async def mixed() -> list[Any]:
        calls = [tiny.generate(chat(q), {"max_tokens": 4 if i % 2 else 24}) for i, q in enumerate(QUESTIONS)]
        return await asyncio.gather(*calls)

    results = run_sync(mixed())
    assert [c.extra["batch_size"] for c in results] == [2, 2, 2, 2]
    assert [c.completion_tokens <= 4 for c in results] == [False, True, False, True]


def test_stop_strings_cut_the_reply(tiny: TransformersBackend) -> None:
    done = run_sync(tiny.generate(chat("Who keeps the light?"), {"stop": ["light", "never"]}))
    assert (done.text, done.finish_reason) == ("I keep the ", "stop")
    assert cut_at_stop("a, b. c", [".", ","]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_sampling_is_seeded(tiny: TransformersBackend) -> None:
    params = {"temperature": 1.5, "top_p": 0.95, "seed": 7, "max_tokens": 12}
    first = run_sync(tiny.generate(chat("Is the sea kind?"), params))
    assert run_sync(tiny.generate(chat("Is the sea kind?"), params)).text == first.text
    kwargs = generation_kwargs(params, tiny.tokenizer)
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"]) == (True, 1.5, 0.95)
    assert generation_kwargs({"temperature": 0}, tiny.tokenizer)["do_sample"] is False


def test_streaming_matches_generate_and_honours_stop(tiny: TransformersBackend) -> None:
    async def collect(params: dict[str, Any]) -> list[str]:
        return [piece async for piece in tiny.stream(chat("What do you teach?"), params)]

    pieces = run_sync(collect({}))
    assert len(pieces) > 2
    assert "".join(pieces) == run_sync(tiny.generate(chat("What do you teach?"), {})).text
    assert "".join(run_sync(collect({"stop": ["patience"]}))) == "I teach reading and "


@pytest.mark.parametrize("params", [{}, {"stop": ["light", "never", "the"]}])
def test_streams_and_plain_calls_share_batches(
    tiny: TransformersBackend, monkeypatch: pytest.MonkeyPatch, params: dict[str, Any]
) -> None:
    alone = [run_sync(tiny.generate(chat(q), params)).text for q in QUESTIONS]
    batch_sizes: list[int] = []
    run_rows = tiny._run_rows

    def counted(conversations: list[Any], *args: Any) -> list[Any]:
        batch_sizes.append(len(conversations))
        return run_rows(conversations, *args)

    monkeypatch.setattr(tiny, "_run_rows", counted)

    async def collect(question: str) -> str:
        return "".join([piece async for piece in tiny.stream(chat(question), params)])

    async def mixed() -> list[Any]:
        streams = [collect(q) for q in QUESTIONS[:3]]
        return await asyncio.gather(*streams, tiny.generate(chat(QUESTIONS[3]), params))

    *streamed, plain = run_sync(mixed())
    assert batch_sizes == [4]  # three streams and a plain call in one model.generate
    assert plain.extra["batch_size"] == 4
    assert [*streamed, plain.text] == alone


def test_a_stream_left_early_stops_its_row_and_the_batch_stops_when_all_are_gone(
    tiny_model_dir: Path,
) -> None:
    backend = local(tiny_model_dir, concurrency=4)
    backend.load()
    backend.model.generation_config.eos_token_id = None  # only the callers can end this batch early
    generate, new_tokens = backend.model.generate, []

    def measured(**kwargs: Any) -> Any:
        output = generate(**kwargs)
        new_tokens.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    backend.model.generate = measured
    params = {"max_tokens": 2000}

    async def first_piece(question: str) -> str:
        async with aclosing(backend.stream(chat(question), params)) as pieces:  # type: ignore[type-var]
            return await anext(pieces)

    async def whole(question: str) -> str:
        return "".join([piece async for piece in backend.stream(chat(question), params)])

    async def both() -> list[str]:
        return await asyncio.gather(first_piece("Is the sea kind?"), whole("Who keeps the light?"))

    first, full = run_sync(both())
    assert first and full == "I keep the light at Skerrow Point."  # the other row was not disturbed
    assert len(new_tokens) == 1 and new_tokens[0] < 500  # far from 2000: nobody was left to read


def test_a_failed_batch_reaches_its_streams(
    tiny: TransformersBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> list[Any]:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tiny, "_run_rows", broken)

    async def collect() -> list[str]:
        return [piece async for piece in tiny.stream(chat("Who keeps the light?"), {})]

    with pytest.raises(RuntimeError, match="out of memory"):
        run_sync(collect())


def test_adapters_switch_per_call(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = make_adapter(tiny_model_dir, tmp_path / "first", seed=1)
    second = make_adapter(tiny_model_dir, tmp_path / "second", seed=2)
    backend = local(tiny_model_dir, adapter=str(first))
    backend.add_adapter("second", second)
    question = chat("Who keeps the light?")

    def reply(adapter: str | None) -> str:
        return run_sync(backend.generate(question, {"adapter": adapter})).text

    base, default, other = reply("base"), reply(None), reply("second")
    assert base == "I keep the light at Skerrow Point."
    assert default != base and other != base and other != default
    assert reply(None) == default and reply("base") == base  # switching back and forth is stable
    with pytest.raises(UserError, match="adapter 'third' is not loaded"):
        reply("third")

    # The cache key names the adapter's weights: retraining it must not serve stale rows.
    cached = make_backend(backend.cfg, CallCache(tmp_path / "cache.sqlite"))
    cached.add_adapter("second", second)  # type: ignore[attr-defined]
    keys = {name: cached.request(question, {"adapter": name})[0] for name in ("base", None, "second")}  # type: ignore[attr-defined]
    assert len(set(keys.values())) == 3
    make_adapter(tiny_model_dir, second, seed=3)
    cached.add_adapter("second", second)  # type: ignore[attr-defined]
    assert cached.request(question, {"adapter": "second"})[0] != keys["second"]  # type: ignore[attr-defined]
    # Re-adding a name on a loaded model replaces its weights.
    backend.add_adapter("second", second)
    fresh = local(tiny_model_dir)
    fresh.add_adapter("second", second)
    retrained = run_sync(fresh.generate(question, {"adapter": "second"})).text
    assert reply("second") == retrained != other


def test_bad_models_and_adapters_are_user_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no adapter_config\.json"):
        local(tiny_model_dir, adapter=str(tmp_path))
    with pytest.raises(UserError, match="full model weights"):
        local(tiny_model_dir, adapter=str(tiny_model_dir))
    with pytest.raises(UserError, match="cannot load"):
        local(tmp_path / "missing-model").load()
    with pytest.raises(UserError, match="no such GGUF file"):
        local(tmp_path / "missing.gguf").load()
    with pytest.raises(UserError, match="reserved"):
        local(tiny_model_dir).add_adapter("base", tmp_path)
    assert pick_dtype("auto", "cuda:0") == "bfloat16" and pick_dtype("auto", "cpu") == "float32"


@pytest.mark.slow
def test_smollm2_answers_and_loads_from_gguf() -> None:
    from persllm.bundled import smollm2_gguf

    question = chat("What is the capital of France? Answer in one word.")
    bundled = run_sync(local("bundled:smollm2").generate(question, {"max_tokens": 12}))
    assert "Paris" in bundled.text
    gguf = run_sync(local(smollm2_gguf()).generate(question, {"max_tokens": 12}))
    assert gguf.text == bundled.text


def test_a_shared_system_prompt_runs_once_and_changes_no_reply(tiny_model_dir: Path) -> None:
    """Rows that begin alike run their beginning once (its cache copied to every row, their own tokens
    after masked padding): the greedy replies and their counts equal those of the plain batch."""
    from persllm.llm.transformers_backend import common_prefix, render_prompt

    profile = "You are Elsie Wren, keeper of the Skerrow Point light, who writes short log entries. " * 2
    conversations = [
        [{"role": "system", "content": profile}, {"role": "user", "content": question}]
        for question in ("Who are you?", "What did the sea do today, and the fog after it?", "Why?", "Hm")
    ]
    backend = local(tiny_model_dir, concurrency=4)
    backend.load()
    rows = [
        list(backend.tokenizer(render_prompt(backend.tokenizer, c), add_special_tokens=False)["input_ids"])
        for c in conversations
    ]
    assert common_prefix(rows) >= backend.shared_prefix_min  # the shared path is the one taken
    params = {"temperature": 0, "max_tokens": 12}
    shared = backend.generate_batch(conversations, params)
    backend.shared_prefix_min = 10**9
    plain = backend.generate_batch(conversations, params)
    assert [c.text for c in shared] == [c.text for c in plain] and all(c.text for c in plain)
    assert [c.prompt_tokens for c in shared] == [c.prompt_tokens for c in plain]
