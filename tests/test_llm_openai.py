"""The openai backend: the real httpx client against a scripted OpenAI-compatible server."""

import asyncio
import socket
import time
from email.utils import formatdate
from typing import Any

import pytest

from persllm.errors import UserError
from persllm.llm import LLMConfig, LLMError, make_backend, run_sync
from persllm.llm import openai_backend as ob
from tests.fake_openai import FakeOpenAI, Fault

USER = [{"role": "user", "content": "Who keeps the light?"}]
SCHEMA = {
    "title": "annotation reply",
    "type": "object",
    "properties": {"analysis": {"type": "string"}, "response": {"type": "string"}},
    "required": ["analysis", "response"],
    "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ob, "BACKOFF_BASE", 0.01)


def backend(server: FakeOpenAI | None = None, **fields: Any) -> Any:
    base_url = server.base_url if server else fields.pop("base_url")
    fields.setdefault("params", {"temperature": 0.0, "max_tokens": 50})
    return make_backend(LLMConfig(backend="openai", model="fake-model", base_url=base_url, **fields))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_reply_usage_and_request_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSLLM_TEST_KEY", "sk-test")
    with FakeOpenAI() as server:
        llm = backend(server, api_key_env="PERSLLM_TEST_KEY")
        done = run_sync(llm.generate(USER, {"temperature": 0.3, "stop": "END", "n_sample": 2, "tag": "x"}))
    assert done.text == "You said: Who keeps the light?"
    assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (4, 6, "stop")
    assert done.seconds > 0 and not done.cached
    body = server.requests[0]
    assert body["model"] == "fake-model" and body["messages"] == USER
    # Call params override config params; cache-only keys never reach the server.
    assert (body["temperature"], body["max_tokens"], body["stop"]) == (0.3, 50, ["END"])
    assert "n_sample" not in body and "tag" not in body and "response_format" not in body
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_429_waits_at_least_retry_after() -> None:
    with FakeOpenAI() as server:
        server.queue(Fault(status=429, retry_after=1.0), "after the wait")
        started = time.perf_counter()
        done = run_sync(backend(server).generate(USER, {}))
        waited = time.perf_counter() - started
    assert done.text == "after the wait"
    assert len(server.requests) == 2
    assert waited >= 1.0


def test_500_then_success() -> None:
    with FakeOpenAI() as server:
        server.queue(Fault(status=500), Fault(status=503), "third time")
        done = run_sync(backend(server).generate(USER, {}))
    assert done.text == "third time"
    assert len(server.requests) == 3


def test_hang_times_out_then_retries() -> None:
    with FakeOpenAI() as server:
        server.queue(Fault(hang=5.0), "quick")
        started = time.perf_counter()
        done = run_sync(backend(server, timeout=0.3).generate(USER, {}))
        elapsed = time.perf_counter() - started
    assert done.text == "quick"
    assert len(server.requests) == 2
    assert elapsed < 4.0  # did not sit out the hang


def test_malformed_body_is_retried_then_raised() -> None:
    with FakeOpenAI() as server:
        server.queue(Fault(body="not json"), "fine")
        assert run_sync(backend(server).generate(USER, {})).text == "fine"
        server.queue(*[Fault(body='{"choices": []}')] * 3)
        with pytest.raises(LLMError, match="malformed reply"):
            run_sync(backend(server, max_retries=2).generate(USER, {}))
    assert len(server.requests) == 2 + 3


def test_connection_refused_is_retried_then_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMError, match=r"failed after 3 attempts \(cannot connect"):
        run_sync(backend(base_url=url, max_retries=2).generate(USER, {}))


def test_errors_the_user_can_fix() -> None:
    with pytest.raises(UserError, match="base_url"):
        make_backend(LLMConfig(backend="openai", model="m"))
    with FakeOpenAI() as server:
        server.queue(Fault(status=401))
        with pytest.raises(UserError, match=r"\$OPENAI_API_KEY"):
            run_sync(backend(server).generate(USER, {}))
        server.queue(Fault(status=404))
        with pytest.raises(UserError, match="check base_url"):
            run_sync(backend(server).generate(USER, {}))
        server.queue(Fault(status=422, body='{"error": {"message": "bad temperature"}}'))
        with pytest.raises(LLMError, match="HTTP 422: bad temperature"):
            run_sync(backend(server).generate(USER, {}))
    assert len(server.requests) == 3  # none of these is retried


def test_structured_output_request_shape() -> None:
    with FakeOpenAI(default_reply='{"analysis": "a", "response": "b"}') as server:
        llm = backend(server)
        assert llm.supports_json_schema
        run_sync(llm.generate(USER, {"response_format": SCHEMA}))
        off = backend(server, structured_output="off")
        assert not off.supports_json_schema
        run_sync(off.generate(USER, {"response_format": SCHEMA}))
    assert server.requests[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "annotation_reply", "schema": SCHEMA, "strict": True},
    }
    assert "response_format" not in server.requests[1]


def test_auto_structured_output_falls_back_when_refused() -> None:
    with FakeOpenAI() as server:
        server.queue(Fault(status=400, body='{"error": {"message": "response_format unsupported"}}'))
        llm = backend(server, max_retries=0)
        done = run_sync(llm.generate(USER, {"response_format": SCHEMA}))
    assert done.text.startswith("You said")
    assert "response_format" in server.requests[0] and "response_format" not in server.requests[1]
    assert not llm.supports_json_schema


def test_concurrency_limit_is_respected() -> None:
    async def many(llm: Any) -> list[Any]:
        return await asyncio.gather(
            *[llm.generate([{"role": "user", "content": f"q{i}"}], {}) for i in range(12)]
        )

    with FakeOpenAI(latency=0.15) as server:
        replies = run_sync(many(backend(server, concurrency=3)))
    assert [r.text for r in replies] == [f"You said: q{i}" for i in range(12)]
    assert server.max_in_flight == 3


def test_streaming_yields_pieces_and_retries_before_the_first() -> None:
    async def collect(llm: Any) -> list[str]:
        return [piece async for piece in llm.stream(USER, {})]

    with FakeOpenAI() as server:
        server.queue(Fault(status=500), "one two three four")
        pieces = run_sync(collect(backend(server)))
    assert "".join(pieces) == "one two three four"
    assert len(pieces) == 4
    assert server.requests[1]["stream"] is True


def test_backend_survives_several_event_loops() -> None:
    with FakeOpenAI() as server:
        llm = backend(server)
        first = run_sync(llm.generate(USER, {}))
        second = run_sync(llm.generate(USER, {"adapter": "lincoln-sft"}))
        run_sync(llm.aclose())
    assert first.text == second.text
    # A served LoRA adapter (vLLM --lora-modules) is addressed by its model name.
    assert [r["model"] for r in server.requests] == ["fake-model", "lincoln-sft"]


def test_length_finish_reason_passes_through() -> None:
    with FakeOpenAI(default_reply="a b c d e f") as server:
        done = run_sync(backend(server).generate(USER, {"max_tokens": 3}))
    assert (done.text, done.finish_reason, done.completion_tokens) == ("a b c", "length", 3)


def test_response_format_retry_after_and_backoff_helpers() -> None:
    ready = {"type": "json_object"}
    assert ob.response_format(ready) is ready
    assert ob.response_format({"type": "object"})["json_schema"]["name"] == "reply"
    assert ob.retry_after("2.5") == 2.5
    assert ob.retry_after(None) is None and ob.retry_after("soon") is None
    assert 8 <= (ob.retry_after(formatdate(time.time() + 10, usegmt=True)) or 0) <= 10
    assert ob.retry_after("99999") == ob.RETRY_AFTER_CAP
    for attempt in range(6):
        assert 0 <= ob.backoff(attempt, None) <= min(ob.BACKOFF_CAP, ob.BACKOFF_BASE * 2**attempt)
        assert ob.backoff(attempt, 1.5) >= 1.5


def test_fake_server_overlaps_64_slow_requests() -> None:
    """The annotation benchmark relies on it: latency is per request, not serialised."""

    async def many(llm: Any) -> list[Any]:
        return await asyncio.gather(
            *[llm.generate([{"role": "user", "content": str(i)}], {}) for i in range(64)]
        )

    with FakeOpenAI(latency=1.0) as server:
        replies = run_sync(many(backend(server, concurrency=64)))
    assert len({r.text for r in replies}) == 64
    assert server.max_in_flight == 64
