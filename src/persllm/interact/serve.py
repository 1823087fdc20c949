"""``persllm serve``: an OpenAI-compatible HTTP API over every persona model, plus a web chat page.

Routes: ``GET /`` (the chat page), ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions`` (streamed as server-sent events when ``stream`` is true). Model ids are
``persona:stage:variant`` and ``base`` (see ``interact.models``). The analysis a persona model writes
before its answer is hidden unless the request sets ``"show_analysis": true`` or the model id ends
in ``+analysis``; it then comes as ``reasoning_content``, as reasoning servers (vLLM, DeepSeek) send it.
Every refusal is a 4xx with OpenAI's error body; limits come from ``ServeConfig``. A request from a web
page (its ``Origin``) other than the server's own or one in ``serve.cors_origins`` is refused before any
route runs, and a chat request must be ``application/json``: any page the user opens could otherwise
drive the server with a plain form or ``text/plain`` POST.
"""

import asyncio
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from persllm.config import Project
from persllm.config.interact import ServeConfig
from persllm.errors import UserError
from persllm.interact import api
from persllm.interact.chat import retriever
from persllm.interact.models import ModelPool, ModelRef, Speaker, list_model_ids, resolve_model_id
from persllm.interact.prompting import ThinkSplitter, fit
from persllm.llm.base import Message
from persllm.prompting import split_inline

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("persllm.serve")


def run(
    project: Project, host: str | None = None, port: int | None = None, api_key_env: str | None = None
) -> None:
    """Load every persona model and serve until interrupted."""
    import uvicorn

    cfg = project.config.serve
    app = create_app(project, api_key=api_key(api_key_env or cfg.api_key_env))
    uvicorn.run(app, host=host or cfg.host, port=port or cfg.port, log_level="info")


def api_key(env: str | None) -> str | None:
    """The bearer token from environment variable ``env``; None when no variable is configured."""
    if not env:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise UserError(
            f"serve.api_key_env: environment variable {env} is empty or unset; export it or drop the option"
        )
    return key


def create_app(
    project: Project, pool: ModelPool | None = None, api_key: str | None = None, preload: bool = True
) -> FastAPI:
    """The FastAPI app; with ``preload`` the base model and every adapter load now, not mid-request."""
    cfg = project.config.serve
    pool = pool or ModelPool(project)
    retrieve = None
    if cfg.retrieval:
        retrieve = retriever(project)
    if preload:
        pool.speakers([resolve_model_id(project, model_id) for model_id in list_model_ids(project)])

    app = FastAPI(title="persllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.add_middleware(OriginGuard, allowed=cfg.cors_origins)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            api.error_body(str(exc.detail), "invalid_request_error", None, code), exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(api.error_body(str(exc), "invalid_request_error", None, "invalid_value"), 400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(api.error_body(f"internal error: {type(exc).__name__}", "server_error"), 500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise api.ApiError(
                401, "missing or wrong API key; send Authorization: Bearer <key>", code="invalid_api_key"
            )

    # ------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(list_model_ids(project))}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return api.models_body(list_model_ids(project))

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        _resolve(project, model_id)
        return api.model_body(model_id)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        refusal = api.content_type_refusal(request.headers.get("content-type"))
        if refusal is not None:
            raise refusal
        body = await read_body(request, cfg.max_body_bytes)
        req = api.parse_request(body, cfg)
        ref = _resolve(project, req.model)
        speaker = await asyncio.to_thread(pool.speaker, ref)
        refusal = api.unsupported(req, getattr(speaker.backend, "inner", speaker.backend))
        if refusal is not None:
            raise refusal
        knowledge, style = "", ""
        if retrieve is not None and ref.persona and ref.stage:
            query = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
            knowledge, style = await asyncio.to_thread(retrieve, ref.persona, ref.stage, query)
        messages = fit_messages(api.prompt_messages(project, ref, req, knowledge, style), speaker, cfg)
        params = api.sampling(req, cfg.params)
        show = req.show_analysis or ref.show_analysis
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            events = stream_events(speaker, messages, params, req.model, show, include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        completion = await speaker.generate(messages, params)
        analysis, response = split_inline(completion.text)
        prompt_tokens = completion.prompt_tokens or speaker.count_tokens(messages)
        usage = api.usage(
            prompt_tokens, completion.completion_tokens or _count_text(speaker, completion.text)
        )
        logprobs = completion.extra.get("logprobs") if req.logprobs else None
        body_out = api.completion_body(
            api.new_id(), req.model, analysis, response, completion.finish_reason, usage, show, logprobs
        )
        return JSONResponse(body_out)

    return app


class OriginGuard:
    """ASGI middleware: refuses requests whose ``Origin`` the server does not trust, answers the CORS
    preflight of those it does, and marks their responses readable by that origin.

    Starlette's CORSMiddleware only withholds the headers: the request itself still runs, and a
    ``text/plain`` POST needs no preflight, so a foreign page could still make the server generate.
    """

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        refusal = api.origin_refusal(origin, headers.get("host"), self.allowed)
        if refusal is not None:
            await JSONResponse(refusal.body(), refusal.status)(scope, receive, send)
            return
        if origin is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            allowed = api.preflight_headers(origin, headers.get("access-control-request-headers"))
            await Response(status_code=204, headers=allowed)(scope, receive, send)
            return

        async def send_readable(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers["Access-Control-Allow-Origin"] = origin
                response_headers.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, send_readable)


def _resolve(project: Project, model_id: str) -> ModelRef:
    try:
        return resolve_model_id(project, model_id)
    except UserError as exc:
        raise api.ApiError(404, str(exc), param="model", code="model_not_found") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    too_large = api.ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise api.ApiError(400, "invalid Content-Length header", code="invalid_request")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


def fit_messages(messages: list[Message], speaker: Speaker, cfg: ServeConfig) -> list[Message]:
    """Trim to the prompt budget; a last message that alone is too long is the client's to shorten."""
    fitted = fit(messages, speaker.count_tokens, cfg.context_tokens, speaker.label)
    if speaker.count_tokens(fitted) > cfg.context_tokens:
        raise api.ApiError(
            400,
            f"the prompt is over this server's budget of {cfg.context_tokens} tokens even with older turns "
            "dropped; shorten the last message or the system prompt",
            param="messages",
            code="context_length_exceeded",
        )
    return fitted


async def stream_events(
    speaker: Speaker,
    messages: list[Message],
    params: dict[str, Any],
    model: str,
    show: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The reply as OpenAI chunks: the role, content (and analysis) deltas, the finish, ``[DONE]``."""
    cid = api.new_id()
    yield api.chunk(cid, model, {"role": "assistant", "content": ""})
    splitter, pieces = ThinkSplitter(), []
    try:
        async for piece in speaker.stream(messages, params):
            pieces.append(piece)
            for event in _deltas(cid, model, splitter.feed(piece), show):
                yield event
        for event in _deltas(cid, model, splitter.finish(), show):
            yield event
    except Exception as exc:  # the status line is gone already: report in-band, as OpenAI does
        log.exception("stream failed")
        error = api.error_body(f"internal error: {type(exc).__name__}", "server_error")
        yield f"data: {json.dumps(error)}\n\n"
        return
    completion_tokens = _count_text(speaker, "".join(pieces))
    finish = "length" if completion_tokens >= int(params.get("max_tokens") or 1 << 30) else "stop"
    yield api.chunk(cid, model, {}, finish)
    if include_usage:
        yield api.usage_chunk(cid, model, api.usage(speaker.count_tokens(messages), completion_tokens))
    yield "data: [DONE]\n\n"


def _deltas(cid: str, model: str, split: tuple[str, str], show: bool) -> list[str]:
    analysis, response = split
    events = [api.chunk(cid, model, {"reasoning_content": analysis})] if analysis and show else []
    return events + ([api.chunk(cid, model, {"content": response})] if response else [])


def _count_text(speaker: Speaker, text: str) -> int:
    tokenizer = speaker.tokenizer
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
