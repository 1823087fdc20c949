"""`persllm serve` under hostile requests, as it runs by default (no API key): each one is refused with a
4xx before it costs the model anything, and the next ordinary request is answered at once. Model ids
never reach a file path; web pages other than the server's own cannot drive it."""

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from persllm.config import Project, load_project
from persllm.config.interact import ServeConfig
from persllm.interact import api, models
from persllm.interact.models import ModelPool, UnknownModel, resolve_model_id
from persllm.interact.serve import create_app
from tests.test_chat_project import build_project
from tests.test_serve import LIMITS, Server, hello, post, refusal

ANSWER_WITHIN_S = 10.0  # a 4-token reply of the tiny model takes well under a second
FOREIGN = "http://evil.example"
BODY_LIMIT = 65_536  # room for a body of 1,000 stop strings, so the stop bound is what refuses it


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Project:
    root = tmp_path_factory.mktemp("hostile")
    return load_project(
        build_project(root, tiny_model_dir, variants=("sft",), serve={**LIMITS, "max_body_bytes": BODY_LIMIT})
    )


@pytest.fixture(scope="module")
def pool(project: Project) -> ModelPool:
    return ModelPool(project)


@pytest.fixture(scope="module")
def server(project: Project, pool: ModelPool) -> Iterator[Server]:
    with Server(create_app(project, pool)) as running:
        yield running


def answered_soon(server: Server) -> None:
    started = time.monotonic()
    response = post(server, hello(max_tokens=4), key=None, timeout=ANSWER_WITHIN_S)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None
    assert time.monotonic() - started < ANSWER_WITHIN_S


def escape_to(project: Project, folder: Path) -> str:
    """A model id whose variant climbs from ``models/elsie`` to ``folder``."""
    return f"elsie:keeper:{os.path.relpath(folder, project.run_dir / 'models' / 'elsie')}"


# ---------------------------------------------------------------------- refused, and the next one answered


def test_hostile_requests_are_4xx_and_the_next_request_is_answered(
    server: Server, project: Project, tmp_path: Path
) -> None:
    outside = tmp_path / "outside" / "model"
    shutil.copytree(project.run_dir / "models" / "jonah" / "sft", outside)  # a real adapter, off limits
    thousand_stops = [f"stop-{i}" for i in range(1000)]
    nine_messages = [{"role": "user", "content": "hi"}] * 9
    cases: list[tuple[Any, dict[str, str], int, str | None, str | None]] = [
        # body, extra headers, status, param, code
        (hello(stop=thousand_stops), {}, 400, "stop", "invalid_value"),
        (hello(stop=["lamp"] * 5), {}, 400, "stop", "invalid_value"),
        (hello(stop="x" * 65), {}, 400, "stop", "invalid_value"),
        (hello(stop=["ok", "y" * 5000]), {}, 400, "stop", "invalid_value"),
        (hello(model="elsie:keeper:../jonah/sft"), {}, 404, "model", "model_not_found"),
        (hello(model="elsie:keeper:../../../../../../../etc"), {}, 404, "model", "model_not_found"),
        (hello(model=escape_to(project, outside)), {}, 404, "model", "model_not_found"),
        (hello(model=f"elsie:keeper:{outside}"), {}, 404, "model", "model_not_found"),
        (hello(model="elsie:keeper:sft/../../jonah/sft"), {}, 404, "model", "model_not_found"),
        (hello(model="elsie:keeper:sft:extra"), {}, 404, "model", "model_not_found"),
        (hello(model="../jonah:keeper:sft"), {}, 404, "model", "model_not_found"),
        (hello(seed=2**70), {}, 400, "seed", None),
        (hello(seed=-1), {}, 400, "seed", None),
        ({"model": "base", "messages": nine_messages}, {}, 400, "messages", "too_many_messages"),
        (hello(n=2), {}, 400, "n", None),
        (hello(messages=[{"role": "user", "content": "x" * BODY_LIMIT}]), {}, 413, None, "request_too_large"),
        (hello(), {"Origin": FOREIGN, "Content-Type": "text/plain"}, 403, None, "origin_not_allowed"),
        (hello(), {"Origin": FOREIGN}, 403, None, "origin_not_allowed"),
        (hello(), {"Origin": "null"}, 403, None, "origin_not_allowed"),
        (hello(), {"Content-Type": "text/plain"}, 415, None, "unsupported_media_type"),
        (hello(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, None, "unsupported_media_type"),
        (hello(), {"Content-Type": "multipart/form-data; boundary=x"}, 415, None, "unsupported_media_type"),
        (hello(), {"Content-Type": ""}, 415, None, "unsupported_media_type"),
    ]
    for body, headers, status, param, code in cases:
        error = refusal(post(server, body, key=None, headers=headers), status, code)
        assert error["param"] == param, (body, error)
        assert "\n" not in error["message"]
        answered_soon(server)


def test_the_stop_string_bounds_hold_for_streams_too(server: Server) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=hello(stream=True, stop=[f"s{i}" for i in range(1000)]),
        timeout=ANSWER_WITHIN_S,
    ) as response:
        assert response.status_code == 400
    answered_soon(server)


def test_a_foreign_preflight_is_refused(server: Server) -> None:
    preflight = {"Origin": FOREIGN, "Access-Control-Request-Method": "POST"}
    for path in ("/v1/chat/completions", "/v1/models", "/"):
        response = httpx.options(server.url + path, headers=preflight, timeout=ANSWER_WITHIN_S)
        refusal(response, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in response.headers
        answered_soon(server)
    foreign_get = httpx.get(server.url + "/v1/models", headers={"Origin": FOREIGN})
    refusal(foreign_get, 403, "origin_not_allowed")


def test_the_servers_own_page_and_plain_clients_still_work(server: Server) -> None:
    # A browser sends the page's own Origin with a same-origin POST, and none with a same-origin GET.
    own = post(server, hello(max_tokens=4), key=None, headers={"Origin": server.url})
    assert own.status_code == 200 and own.headers["access-control-allow-origin"] == server.url
    named = f"http://localhost:{server.port}"
    assert (
        post(
            server,
            hello(max_tokens=4),
            key=None,
            headers={"Origin": named, "Host": f"localhost:{server.port}"},
        ).status_code
        == 200
    )
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 200
    charset = post(
        server, hello(max_tokens=4), key=None, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert charset.status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="elsie:keeper:sft", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    streamed = client.chat.completions.create(
        model="elsie:keeper:sft", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, stream=True
    )
    assert [chunk.choices[0].finish_reason for chunk in streamed if chunk.choices][-1] in ("stop", "length")


def test_configured_origins_get_cors_answers(project: Project, pool: ModelPool) -> None:
    allowed = "https://app.example"
    configured = load_project(project.config_path, {"serve.cors_origins": [allowed + "/"]})
    with Server(create_app(configured, pool)) as running:
        preflight = httpx.options(
            f"{running.url}/v1/chat/completions",
            headers={
                "Origin": allowed,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == allowed
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
        assert "Origin" in preflight.headers["vary"]
        response = post(running, hello(max_tokens=4), key=None, headers={"Origin": allowed})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == allowed
        refusal(post(running, hello(), key=None, headers={"Origin": "https://other.example"}), 403)
        refusal(
            post(running, hello(), key=None, headers={"Origin": allowed, "Content-Type": "text/plain"}), 415
        )


# ---------------------------------------------------------------------- the pure checks


def test_model_ids_are_matched_against_known_names_before_any_path(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked: list[tuple[Any, ...]] = []
    real = models.trained_dir
    monkeypatch.setattr(models, "trained_dir", lambda *args: looked.append(args) or real(*args))
    for bad in (
        "elsie:keeper:../jonah/sft",
        "elsie:keeper:../../../../tmp/x",
        "elsie:keeper:/tmp/x",
        "elsie:keeper:sft/..",
        "elsie:keeper:",
        "elsie:keeper:SFT",
        "elsie:keeper:sft:sft",
        "elsie:..:sft",
        "elsie",
        "",
        "base:keeper",
        "nobody:keeper:sft",
    ):
        with pytest.raises(UnknownModel):
            resolve_model_id(project, bad)
    assert looked == []
    assert resolve_model_id(project, "elsie:keeper:sft").path == project.run_dir / "models" / "elsie" / "sft"
    assert resolve_model_id(project, "elsie:keeper").variant == "sft"
    assert resolve_model_id(project, "elsie:keeper:prompt+analysis").show_analysis
    assert {args[1:] for args in looked} <= {("elsie", "sft"), ("elsie", "dpo")}


def test_stop_bounds_come_from_config() -> None:
    cfg = ServeConfig.model_validate({"max_stop_strings": 2, "max_stop_chars": 3})
    assert api.stop_refusal(["a", "bcd"], cfg) is None and api.stop_refusal("abc", cfg) is None
    assert api.stop_refusal(None, cfg) is None
    too_many = api.stop_refusal(["a", "b", "c"], cfg)
    assert too_many is not None and too_many.status == 400 and too_many.param == "stop"
    too_long = api.stop_refusal("abcd", cfg)
    assert too_long is not None and "at most 3" in too_long.message
    defaults = ServeConfig()
    assert (defaults.max_stop_strings, defaults.max_stop_chars, defaults.cors_origins) == (4, 64, [])


def test_origin_and_content_type_checks() -> None:
    assert api.origin_refusal(None, "127.0.0.1:8000", []) is None
    assert api.origin_refusal("http://127.0.0.1:8000", "127.0.0.1:8000", []) is None
    assert api.origin_refusal("http://LOCALHOST:8000/", "localhost:8000", []) is None
    assert api.origin_refusal("https://app.example", "127.0.0.1:8000", ["https://app.example"]) is None
    for origin, host in [
        ("http://127.0.0.1:8001", "127.0.0.1:8000"),
        ("http://127.0.0.1", "127.0.0.1:8000"),
        ("null", "127.0.0.1:8000"),
        ("file://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://127.0.0.1:8000", None),
    ]:
        refused = api.origin_refusal(origin, host, [])
        assert refused is not None and refused.status == 403, origin
    assert api.content_type_refusal("application/json") is None
    assert api.content_type_refusal("Application/JSON; charset=utf-8") is None
    for kind in (None, "", "text/plain", "application/json-patch+json", "text/json"):
        refused = api.content_type_refusal(kind)
        assert refused is not None and refused.status == 415, kind
    with pytest.raises(ValueError, match="not an origin"):
        ServeConfig.model_validate({"cors_origins": ["https://app.example/path"]})
    assert ServeConfig.model_validate({"cors_origins": ["HTTPS://App.Example/"]}).cors_origins == [
        "https://app.example"
    ]
