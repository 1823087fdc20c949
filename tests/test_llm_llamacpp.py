"""The llamacpp backend on the bundled SmolLM2 GGUF file, run by llama.cpp in this process."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from persllm.errors import UserError
from persllm.llm import CallCache, LlamaCppBackend, LLMConfig, make_backend, run_sync
from persllm.llm.llamacpp_backend import completion_of, request_body

GREEDY = {"temperature": 0.0, "max_tokens": 16}
QUESTIONS = ["Name a colour.", "What is the capital of France?", "Say hello.", "Count to three."]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def config(**fields: Any) -> LLMConfig:
    fields.setdefault("params", GREEDY)
    return LLMConfig(backend="llamacpp", model=fields.pop("model", "bundled:smollm2"), **fields)


@pytest.fixture(scope="module")
def engine() -> Any:
    backend = LlamaCppBackend(config(concurrency=4))
    yield backend
    run_sync(backend.aclose())


def test_generates_greedily_with_counts_and_finish_reason(engine: LlamaCppBackend) -> None:
    async def twice() -> list[Any]:
        return [await engine.generate(chat("Say hello."), {}) for _ in range(2)]

    first, again = run_sync(twice())
    assert first.text and first.text == again.text  # greedy is deterministic
    assert first.finish_reason in ("stop", "length") and 0 < first.completion_tokens <= 16
    assert first.prompt_tokens > 5 and first.seconds > 0
    capped = run_sync(engine.generate(chat("Tell me a long story about the sea."), {"max_tokens": 5}))
    assert capped.finish_reason == "length" and capped.completion_tokens == 5


def test_parallel_slots_answer_every_call(engine: LlamaCppBackend) -> None:
    async def together() -> list[Any]:
        return await asyncio.gather(*(engine.generate(chat(q), {}) for q in QUESTIONS))

    answers = run_sync(together())
    assert len(answers) == 4 and all(a.text for a in answers)
    assert len({a.text for a in answers}) >= 3  # each slot answered its own question


def test_stream_yields_the_same_text_in_pieces(engine: LlamaCppBackend) -> None:
    async def collect() -> list[str]:
        return [piece async for piece in engine.stream(chat("Name a colour."), {})]

    pieces = run_sync(collect())
    whole = run_sync(engine.generate(chat("Name a colour."), {})).text
    assert len(pieces) > 2 and "".join(pieces) == whole


def test_json_schema_is_grammar_constrained(engine: LlamaCppBackend) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["colour", "count"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    done = run_sync(
        engine.generate(
            chat("Name a colour and a number."), {"response_format": response_format, "max_tokens": 40}
        )
    )
    data = json.loads(done.text)
    assert isinstance(data["colour"], str) and isinstance(data["count"], int)
    assert engine.supports_json_schema


def test_stop_strings_cut_the_reply(engine: LlamaCppBackend) -> None:
    whole = run_sync(engine.generate(chat("Say hello."), {})).text
    cut = run_sync(engine.generate(chat("Say hello."), {"stop": ["l"]})).text
    assert "l" in whole and cut == whole[: whole.index("l")]


def test_calls_are_cached_and_logged(tmp_path: Path) -> None:
    cache = CallCache(tmp_path / "cache.sqlite")
    backend = make_backend(config(), cache, tag="test")
    try:
        first = run_sync(backend.generate(chat("Say hello."), {}))
        second = run_sync(backend.generate(chat("Say hello."), {}))
    finally:
        run_sync(backend.aclose())
    assert not first.cached and second.cached and second.text == first.text
    rows = cache.recent(5)
    assert [r["cached"] for r in rows] == [True, False]
    assert rows[1]["backend"] == "llamacpp" and rows[1]["request"]["messages"] == chat("Say hello.")


def test_bad_files_and_adapters_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.gguf'?: no such file; .*\.gguf"):
        LlamaCppBackend(config(model=str(tmp_path / "missing.gguf")))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    with pytest.raises(UserError, match=r"notes\.gguf is not a GGUF file"):
        LlamaCppBackend(config(model=str(text)))
    with pytest.raises(UserError, match=r"adapter: .* is not a GGUF file; give a LoRA adapter"):
        LlamaCppBackend(config(adapter=str(tmp_path)))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match=r"llama\.cpp cannot load .*cut\.gguf"):
        LlamaCppBackend(config(model=str(truncated))).load()


def test_request_body_and_engine_errors_are_pure() -> None:
    body = request_body(chat("hi"), {"temperature": 0, "max_tokens": 8, "stop": "x", "seed": 3})
    assert body == {
        "messages": chat("hi"),
        "max_tokens": 8,
        "temperature": 0.0,
        "stream": False,
        "seed": 3,
        "stop": ["x"],
    }
    with pytest.raises(UserError, match="the engine refused the request: bad grammar"):
        completion_of({"error": {"message": "bad grammar"}}, 0.1)


def test_same_first_tokens_as_transformers_on_the_same_weights(engine: LlamaCppBackend) -> None:
    """llama.cpp runs the Q4_1 file; transformers its fp32 dequantisation: the greedy starts agree."""
    from persllm.llm import TransformersBackend

    question = chat("What is the capital of France? Answer in one word.")
    reference = TransformersBackend(LLMConfig(model="bundled:smollm2", params=GREEDY))
    expected = run_sync(reference.generate(question, {"max_tokens": 6})).text
    got = run_sync(engine.generate(question, {"max_tokens": 6})).text
    assert "Paris" in got and got.split()[:2] == expected.split()[:2]
