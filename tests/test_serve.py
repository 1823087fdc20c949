"""`persllm serve` started for real (uvicorn on 127.0.0.1) and driven with the official openai client and
raw HTTP: models, completions streamed and not, auth, limits, malformed requests, concurrency."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from persllm.config import Project, load_project
from persllm.config.interact import ServeConfig
from persllm.interact import api
from persllm.interact.models import ModelPool, resolve_model_id
from persllm.interact.prompting import label_first_user
from persllm.interact.serve import create_app
from persllm.prompting import split_inline
from tests.fake_openai import FakeOpenAI
from tests.test_chat_project import build_project, write_project

KEY = "sekrit-key-123"
LIMITS = {"max_messages": 8, "max_tokens_limit": 64, "max_body_bytes": 4096, "context_tokens": 512}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """uvicorn serving ``app`` in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Project:
    root = tmp_path_factory.mktemp("serve")
    # jonah was trained with new stage tokens: served on a base of its own beside elsie's plain adapters.
    project_file = build_project(
        root, tiny_model_dir, variants=("sft", "dpo"), grown=("jonah",), serve=LIMITS
    )
    return load_project(project_file)


@pytest.fixture(scope="module")
def pool(project: Project) -> ModelPool:
    return ModelPool(project)


@pytest.fixture(scope="module")
def server(project: Project, pool: ModelPool) -> Iterator[Server]:
    with Server(create_app(project, pool, api_key=KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(
    server: Server, body: Any, key: str | None = KEY, headers: dict[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    kwargs.setdefault("timeout", 60)
    return httpx.post(
        f"{server.url}/v1/chat/completions", content=content, headers={**sent, **(headers or {})}, **kwargs
    )


def hello(model: str = "elsie:keeper:sft", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Who keeps the light?"}], **extra}


# ---------------------------------------------------------------------- the openai client


def test_models_list_with_the_openai_client(client: openai.OpenAI, project: Project) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[0] == "base"
    for expected in (
        "elsie:keeper:sft",
        "elsie:keeper:dpo",
        "elsie:engineer:dpo",
        "jonah:mayor:sft",
        "jonah:mayor:prompt",
    ):
        assert expected in ids
    assert "jonah:mayor:dpo" not in ids
    assert len(ids) == 1 + 2 * 3 + 2 * 2  # base; elsie: prompt/sft/dpo x 2 stages; jonah: prompt/sft x 2
    assert client.models.retrieve("elsie:keeper:dpo").id == "elsie:keeper:dpo"


def test_completion_streamed_and_not_agree(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Who keeps the light?"}]
    whole = client.chat.completions.create(
        model="elsie:keeper:sft", messages=messages, max_tokens=12, temperature=0
    )
    choice = whole.choices[0]
    assert (
        whole.object == "chat.completion"
        and whole.model == "elsie:keeper:sft"
        and whole.id.startswith("chatcmpl-")
    )
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert (
        whole.usage is not None and 0 < whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 10
    )

    stream = client.chat.completions.create(
        model="elsie:keeper:sft",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: the same reply either way
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens
    # a stream yields text, so its completion tokens are counted by re-tokenising it: close, not exact
    assert abs(usage.completion_tokens - whole.usage.completion_tokens) <= 2


def test_sse_wire_format(server: Server) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=hello(stream=True, max_tokens=6),
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_stage_label_and_system_prompt_reach_the_model(project: Project, pool: ModelPool) -> None:
    from persllm.interact.models import resolve_model_id
    from persllm.interact.serve import fit_messages

    request = api.parse_request(
        json.dumps(
            {
                "model": "elsie:engineer:dpo",
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                    {"role": "assistant", "content": "<think>\nhm\n</think>\nGood day."},
                    {"role": "user", "content": "Again"},
                ],
            }
        ).encode(),
        project.config.serve,
    )
    ref = resolve_model_id(project, request.model)
    messages = fit_messages(
        api.prompt_messages(project, ref, request), pool.speaker(ref), project.config.serve
    )
    assert messages[0]["content"].startswith("You are Elsie Wren.") and messages[0]["content"].endswith(
        "Answer briefly."
    )
    assert messages[1] == {"role": "user", "content": "<TIME-II> Hello"}
    assert messages[2] == {"role": "assistant", "content": "Good day."}
    base = resolve_model_id(project, "base")
    plain = api.prompt_messages(project, base, request)
    assert plain[0] == {"role": "system", "content": "Answer briefly."} and plain[1]["content"] == "Hello"


# ---------------------------------------------------------------------- auth


def test_missing_and_wrong_keys_are_401(server: Server) -> None:
    for key in (None, "wrong-key", KEY + "x", ""):
        response = post(server, hello(), key=key)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert set(error) == {"message", "type", "param", "code"}
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Basic abc"})
    assert response.status_code == 401
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key


def test_no_key_configured_means_open(project: Project, pool: ModelPool) -> None:
    with Server(create_app(project, pool, api_key=None)) as open_server:
        response = post(open_server, hello(max_tokens=4), key=None)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None


# ---------------------------------------------------------------------- refusals


def refusal(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_malformed_requests_are_4xx_with_openai_errors(server: Server) -> None:
    refusal(post(server, b"{not json"), 400, "invalid_json")
    refusal(post(server, b"[1, 2]"), 400, "invalid_json")
    refusal(post(server, b"\xff\xfe"), 400, "invalid_json")
    nine = [{"role": "user", "content": "hi"}] * 9
    assert (
        refusal(post(server, {"model": "base", "messages": nine}), 400, "too_many_messages")["param"]
        == "messages"
    )
    assert refusal(post(server, hello(max_tokens=65)), 400)["param"] == "max_tokens"
    assert refusal(post(server, hello(max_completion_tokens=500)), 400)["param"] == "max_completion_tokens"
    assert refusal(post(server, hello(model="nobody:keeper:sft")), 404, "model_not_found")["param"] == "model"
    refusal(post(server, hello(model="jonah:mayor:dpo")), 404, "model_not_found")
    refusal(post(server, hello(model="elsie:moon")), 404, "model_not_found")
    assert refusal(post(server, {"model": "base"}), 400)["param"] == "messages"
    assert refusal(post(server, {"model": "base", "messages": []}), 400)["param"] == "messages"
    assert (
        "messages.0.role"
        in refusal(post(server, {"model": "base", "messages": [{"role": "x"}]}), 400)["param"]
    )
    refusal(post(server, hello(temperature=5)), 400)
    refusal(post(server, hello(n=2)), 400)
    refusal(post(server, hello(max_tokens="many")), 400)
    refusal(post(server, {"model": "base", "messages": [{"role": "user", "content": "x " * 2500}]}), 413)
    long_prompt = {"model": "base", "messages": [{"role": "user", "content": "lamp " * 700}]}
    refusal(post(server, long_prompt), 400, "context_length_exceeded")
    refusal(httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    refusal(httpx.get(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)


def test_fields_the_backend_cannot_honour_are_400_naming_the_field(server: Server) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param in [
        (hello(tools=[tool]), "tools"),
        (hello(tool_choice="auto"), "tool_choice"),
        (hello(logit_bias={"1": 5}), "logit_bias"),
        (hello(frequency_penalty=0.5), "frequency_penalty"),
        (hello(response_format={"type": "json_object"}), "response_format"),
        (hello(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format"),
        (hello(response_format={"type": "yaml"}), "response_format"),
        (hello(logprobs=True, stream=True), "logprobs"),
        (hello(top_logprobs=2), "top_logprobs"),
    ]:
        assert refusal(post(server, body), 400)["param"] == param, body
    assert (
        "response_format json_object: this server's backend (transformers)"
        in (refusal(post(server, hello(response_format={"type": "json_object"})), 400)["message"])
    )
    assert refusal(post(server, hello(seed=2**70)), 400)["param"] == "seed"
    for harmless in (hello(user="u-1"), hello(response_format={"type": "text"}), hello(frequency_penalty=0)):
        assert post(server, {**harmless, "max_tokens": 2}).status_code == 200


def test_logprobs_come_back_for_every_generated_token(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Who keeps the light?"}]
    reply = client.chat.completions.create(
        model="elsie:keeper:sft",
        messages=messages,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    content = choice.logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens
    assert "".join(item.token for item in content).strip() == (choice.message.content or "").strip()
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob - 1e-5  # greedy: the chosen token is the top one
        assert item.top_logprobs[0].token == item.token


def test_a_llamacpp_server_honours_json_schemas_and_logprobs_and_serves_adapters_side_by_side(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """base_model.backend: llamacpp on a GGUF base: the personas are LoRA adapter files of one engine that
    answer as the PEFT adapters do in transformers; response_format and logprobs are honoured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.llm import LLMConfig, TransformersBackend
    from persllm.train.gguf_export import write_gguf

    base = tmp_path / "base.gguf"
    write_gguf(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
        base,
        "tiny",
        "f32",
    )
    root = tmp_path / "project"
    root.mkdir()
    project = load_project(
        build_project(root, tiny_model_dir, serve=LIMITS),
        {"base_model.backend": "llamacpp", "base_model.model": str(base)},
    )
    reference = TransformersBackend(
        LLMConfig(model=str(tiny_model_dir), device="cpu", params={"temperature": 0, "max_tokens": 10})
    )
    schema = {"type": "object", "properties": {"lamp": {"type": "boolean"}}, "required": ["lamp"]}
    with Server(create_app(project, ModelPool(project))) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0, timeout=60)
        for pid in ("elsie", "jonah"):
            folder = project.run_dir / "models" / pid / "sft"
            reference.add_adapter(pid, folder)
            assert (folder.parent / "sft.lora.gguf").exists()
            reply = client.chat.completions.create(
                model=f"{pid}:{project.persona(pid).stages[0].id}:sft",
                messages=[{"role": "user", "content": "Is the sea kind?"}],
                max_tokens=10,
                temperature=0,
                logprobs=True,
            )
            ref = resolve_model_id(project, f"{pid}:{project.persona(pid).stages[0].id}:sft")
            body = {"model": ref.id, "messages": [{"role": "user", "content": "Is the sea kind?"}]}
            request = api.parse_request(json.dumps(body).encode(), project.config.serve)
            messages = label_first_user(api.prompt_messages(project, ref, request), "<TIME-I>")
            (expected,) = reference.generate_batch([messages], {"adapter": pid})
            assert reply.choices[0].message.content == split_inline(expected.text)[1]
            assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
        structured = client.chat.completions.create(
            model="elsie:keeper:sft",
            messages=[{"role": "user", "content": "Is the lamp lit? Answer in JSON."}],
            max_tokens=64,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "lamp", "schema": schema}},
        )
        content = structured.choices[0].message.content or ""
        assert isinstance(json.loads(content)["lamp"], bool), repr(content)
        with pytest.raises(openai.BadRequestError, match="tools"):
            client.chat.completions.create(
                model="elsie:keeper:sft",
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            )


def test_oversized_chunked_body_is_cut_off(server: Server) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "base", "messages": [{"role": "user", "content": "'
        for _ in range(50):
            yield b"x" * 200
        yield b'"}]}'

    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    refusal(response, 413, "request_too_large")


def test_openai_client_raises_on_refusals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
        )


# ---------------------------------------------------------------------- concurrency


def test_concurrent_requests_use_the_right_adapters(server: Server, client: openai.OpenAI) -> None:
    models = ["elsie:keeper:sft", "jonah:mayor:sft", "elsie:keeper:dpo", "base"] * 2

    def ask(model: str) -> str:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Is the sea kind?"}],
            max_tokens=10,
            temperature=0,
        )
        return reply.choices[0].message.content or ""

    alone = {model: ask(model) for model in models[:4]}
    assert len(set(alone.values())) >= 3  # the adapters really make different models
    with ThreadPoolExecutor(8) as workers:
        together = list(workers.map(ask, models))
    assert together == [alone[model] for model in models]


def test_streamed_and_plain_requests_decode_in_the_same_batches(
    client: openai.OpenAI, pool: ModelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three streams and a plain request: the first batch is held until the others are queued behind
    it, so all four run in at most two model.generate calls, and each reply is its own."""
    questions = ["Who keeps the light?", "Is the sea kind?", "What do you teach?", "What burns in the lamp?"]

    def ask(question: str, stream: bool) -> str:
        messages: Any = [{"role": "user", "content": question}]
        if not stream:
            reply = client.chat.completions.create(
                model="elsie:keeper:sft", messages=messages, max_tokens=10, temperature=0
            )
            return reply.choices[0].message.content or ""
        chunks = client.chat.completions.create(
            model="elsie:keeper:sft", messages=messages, max_tokens=10, temperature=0, stream=True
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    alone = [ask(question, False) for question in questions]
    backend = pool.base()
    run_rows, batch_sizes = backend._run_rows, []

    def first_batch_held(conversations: list[Any], *args: Any) -> list[Any]:
        batch_sizes.append(len(conversations))
        deadline = time.monotonic() + 30
        while len(batch_sizes) == 1 and time.monotonic() < deadline:
            if len(conversations) + len(backend._batcher.pending) >= len(questions):
                break
            time.sleep(0.01)
        return run_rows(conversations, *args)

    monkeypatch.setattr(backend, "_run_rows", first_batch_held)
    with ThreadPoolExecutor(len(questions)) as workers:
        together = list(workers.map(ask, questions, [True, True, True, False]))
    assert together == alone
    assert sum(batch_sizes) == len(questions) and len(batch_sizes) <= 2, batch_sizes


# ---------------------------------------------------------------------- the analysis, web page, CLI

ANALYSED = "<think>\nThe user asks about the lamp.\n</think>\nThe lamp burns paraffin."


def test_analysis_hidden_unless_asked(tmp_path: Path, tiny_model_dir: Path) -> None:
    with FakeOpenAI(default_reply=ANALYSED) as upstream:
        overrides = {"base_model.backend": "openai", "base_model.base_url": upstream.base_url}
        project = load_project(write_project(tmp_path, tiny_model_dir), overrides)
        with Server(create_app(project)) as running:
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
            assert "elsie:keeper:sft" not in [m.id for m in client.models.list()]
            messages: Any = [{"role": "user", "content": "The lamp?"}]
            hidden = client.chat.completions.create(model="elsie:keeper:prompt", messages=messages)
            assert hidden.choices[0].message.content == "The lamp burns paraffin."
            assert getattr(hidden.choices[0].message, "reasoning_content", None) is None
            shown = client.chat.completions.create(
                model="elsie:keeper:prompt", messages=messages, extra_body={"show_analysis": True}
            )
            assert shown.choices[0].message.content == "The lamp burns paraffin."
            assert shown.choices[0].message.model_extra == {
                "reasoning_content": "The user asks about the lamp."
            }
            suffixed = client.chat.completions.create(model="elsie:keeper:prompt+analysis", messages=messages)
            assert suffixed.choices[0].message.model_extra == {
                "reasoning_content": "The user asks about the lamp."
            }
            chunks = list(
                client.chat.completions.create(model="elsie:keeper:prompt", messages=messages, stream=True)
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The lamp burns paraffin."
            assert not any((c.choices[0].delta.model_extra or {}).get("reasoning_content") for c in chunks)
            chunks = list(
                client.chat.completions.create(
                    model="elsie:keeper:prompt",
                    messages=messages,
                    stream=True,
                    extra_body={"show_analysis": True},
                )
            )
            analysis = "".join(
                (c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks
            )
            assert analysis.strip() == "The user asks about the lamp."
            assert upstream.requests[0]["messages"][0]["content"].startswith("You are Elsie Wren.")


def test_web_page_and_health(server: Server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/models" in page.text and "getReader" in page.text
    assert (
        "http://" not in page.text and "https://" not in page.text and "<link" not in page.text
    )  # no external assets
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "models": 11}


def test_api_limits_come_from_config() -> None:
    cfg = ServeConfig.model_validate({"max_messages": 2, "max_tokens_limit": 5})
    with pytest.raises(api.ApiError) as too_many:
        api.parse_request(json.dumps(hello(messages=[{"role": "user", "content": "a"}] * 3)).encode(), cfg)
    assert too_many.value.status == 400 and too_many.value.code == "too_many_messages"
    request = api.parse_request(json.dumps(hello(max_tokens=5, temperature=0.1, stop="x")).encode(), cfg)
    assert api.sampling(request, {"temperature": 0.7, "top_p": 0.9}) == {
        "temperature": 0.1,
        "top_p": 0.9,
        "max_tokens": 5,
        "stop": "x",
    }


@pytest.mark.slow
def test_cli_serve(project: Project) -> None:
    runner = CliRunner()
    from persllm.cli import app

    assert "Example:" in runner.invoke(app, ["serve", "--help"]).output
    binary = [sys.executable, "-m", "persllm.cli"]
    env = {**os.environ, "PERSLLM_TEST_KEY": "k-123", "HF_HUB_OFFLINE": "1"}
    missing = subprocess.run(
        [*binary, "serve", str(project.config_path), "--api-key-env", "PERSLLM_UNSET_VAR"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2 and "PERSLLM_UNSET_VAR" in missing.stderr
    port = free_port()
    args = [
        *binary,
        "serve",
        str(project.config_path),
        "--port",
        str(port),
        "--api-key-env",
        "PERSLLM_TEST_KEY",
    ]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        live = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0)
        reply = live.chat.completions.create(
            model="jonah:mayor:sft", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
