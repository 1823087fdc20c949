"""The OpenAI chat-completions wire format, as pure functions: request checking, prompt, reply bodies.

``serve`` keeps the HTTP side; everything here takes and returns plain data so it is tested without a
server.
"""

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from persllm.config import Project
from persllm.config.interact import ServeConfig
from persllm.interact.models import ModelRef
from persllm.interact.prompting import merge_consecutive, persona_system
from persllm.llm.base import Message
from persllm.prompting import split_inline


class ApiError(Exception):
    """A request the server refuses, with the OpenAI error body's fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    """The fields persllm honours. Any other field is refused (``unsupported``) rather than ignored, as
    OpenAI refuses an unrecognised argument: a client that asks for tools or penalties must not get a 200
    that quietly did without them.

    ``show_analysis`` (persllm's own field) returns the model's analysis as ``reasoning_content``.
    """

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    show_analysis: bool = False


# OpenAI fields that do not change the reply: accepted and not used.
NO_EFFECT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def unsupported(request: ChatRequest, backend: Any) -> ApiError | None:
    """The 400 for the first request field this server (with ``backend``) cannot honour, or None.

    ``backend`` says what it can do through ``supports_json_schema`` (grammar-constrained JSON) and
    ``supports_logprobs``.
    """
    for name in request.model_extra or {}:
        if name not in NO_EFFECT:
            return ApiError(
                400,
                f"{name}: this server does not support this parameter; remove it",
                name,
                "unsupported_parameter",
            )
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            return ApiError(
                400,
                f"{name}: this server does not apply penalties; send 0 or leave it out",
                name,
                "unsupported_parameter",
            )
    kind = (request.response_format or {}).get("type", "text")
    if kind not in RESPONSE_FORMATS:
        return ApiError(
            400, f"response_format.type {kind!r}: use one of {', '.join(RESPONSE_FORMATS)}", "response_format"
        )
    if kind == "json_schema" and not isinstance((request.response_format or {}).get("json_schema"), dict):
        return ApiError(400, "response_format.json_schema: give the schema object", "response_format")
    if kind != "text" and not getattr(backend, "supports_json_schema", False):
        return ApiError(
            400,
            f"response_format {kind}: this server's backend ({getattr(backend, 'name', '?')}) has no "
            "constrained decoding; run it with base_model.backend: llamacpp",
            "response_format",
            "unsupported_parameter",
        )
    if request.logprobs or request.top_logprobs:
        if not request.logprobs:
            return ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if not getattr(backend, "supports_logprobs", False):
            return ApiError(
                400,
                f"logprobs: this server's backend ({getattr(backend, 'name', '?')}) cannot return them",
                "logprobs",
                "unsupported_parameter",
            )
        if request.stream:
            return ApiError(
                400, "logprobs: not available with stream: true; ask without streaming", "logprobs"
            )
    return None


def parse_request(raw: bytes, cfg: ServeConfig) -> ChatRequest:
    """The checked request, or an ``ApiError`` (400) saying what is wrong with it."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > cfg.max_messages:
        raise ApiError(
            400,
            f"too many messages ({len(messages)}); this server accepts at most {cfg.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise ApiError(400, f"{param}: {error['msg']}", param=param, code="invalid_value") from None
    limit = request.max_completion_tokens or request.max_tokens
    if limit is not None and limit > cfg.max_tokens_limit:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise ApiError(
            400,
            f"{param} is {limit}; this server allows at most {cfg.max_tokens_limit}",
            param,
            "invalid_value",
        )
    refusal = stop_refusal(request.stop, cfg)
    if refusal is not None:
        raise refusal
    return request


def stop_refusal(stop: str | list[str] | None, cfg: ServeConfig) -> ApiError | None:
    """The 400 for a ``stop`` over this server's bounds (each stop string is searched for in every step
    of every reply, so their number and length bound the work one request can cost), or None."""
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > cfg.max_stop_strings:
        return ApiError(
            400,
            f"stop has {len(stops)} strings; this server accepts at most {cfg.max_stop_strings}",
            "stop",
            "invalid_value",
        )
    longest = max(stops, key=len, default="")
    if len(longest) > cfg.max_stop_chars:
        return ApiError(
            400,
            f"stop: a string of {len(longest)} characters; this server accepts at most {cfg.max_stop_chars}",
            "stop",
            "invalid_value",
        )
    return None


def content_type_refusal(content_type: str | None) -> ApiError | None:
    """The 415 for a request body that is not declared JSON, or None.

    Browsers send ``text/plain``, form and multipart bodies cross-origin without asking first; requiring
    ``application/json`` makes every cross-origin call go through a preflight the server can refuse.
    """
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "application/json":
        return None
    shown = media_type or "none"
    return ApiError(
        415,
        f"Content-Type {shown}: send the body as JSON with Content-Type: application/json",
        code="unsupported_media_type",
    )


def origin_refusal(origin: str | None, host: str | None, allowed: list[str]) -> ApiError | None:
    """The 403 for a browser request from a web page this server does not trust, or None.

    No ``Origin`` (not a browser, or a same-origin GET) is fine; so is the server's own origin (its chat
    page: browsers send ``Origin`` on same-origin POSTs), recognised by the origin's host[:port] being
    the request's ``Host``, and any origin in ``serve.cors_origins``.
    """
    if origin is None or origin_allowed(origin, host, allowed):
        return None
    return ApiError(
        403,
        f"requests from the web origin {origin[:100]!r} are not allowed; add it to serve.cors_origins",
        code="origin_not_allowed",
    )


def origin_allowed(origin: str, host: str | None, allowed: list[str]) -> bool:
    normalised = origin.strip().rstrip("/").lower()
    if normalised in allowed:
        return True
    scheme, separator, netloc = normalised.partition("://")
    same_host = host is not None and netloc == host.strip().lower()
    return bool(separator) and scheme in ("http", "https") and same_host


PREFLIGHT_METHODS = "GET, POST, OPTIONS"
PREFLIGHT_HEADERS = "Authorization, Content-Type"


def preflight_headers(origin: str, requested_headers: str | None) -> dict[str, str]:
    """The CORS answer to an allowed origin's preflight (``OPTIONS``): what it may send, for how long.
    The origin is trusted, so the headers it asks for (the openai JS client adds its own) are granted."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": PREFLIGHT_METHODS,
        "Access-Control-Allow-Headers": requested_headers or PREFLIGHT_HEADERS,
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }


def sampling(request: ChatRequest, defaults: dict[str, Any]) -> dict[str, Any]:
    """Backend params: the server's defaults, then what the request set."""
    params = dict(defaults)
    limit = request.max_completion_tokens or request.max_tokens
    kind = (request.response_format or {}).get("type", "text")
    given = {
        "max_tokens": limit,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": request.stop,
        "response_format": request.response_format if kind != "text" else None,
        "logprobs": True if request.logprobs else None,
        "top_logprobs": request.top_logprobs if request.logprobs else None,
    }
    params.update({key: value for key, value in given.items() if value is not None})
    return params


def prompt_messages(
    project: Project, ref: ModelRef, request: ChatRequest, knowledge: str = "", style: str = ""
) -> list[Message]:
    """The request's messages as the model should see them.

    A persona model gets its training-time system prompt first; a client's own system messages are
    added after it. Earlier assistant turns keep only their response (as at training time). The stage
    label is added once the conversation is trimmed to the budget (``prompting.fit``).
    """
    system, turns = [], []
    for message in request.messages:
        text = message.text()
        if message.role in ("system", "developer"):
            system.append(text)
        elif message.role == "assistant":
            turns.append({"role": "assistant", "content": split_inline(text)[1]})
        else:
            turns.append({"role": "user", "content": text})
    if ref.persona is not None and ref.stage is not None:
        persona = project.persona(ref.persona)
        system.insert(0, persona_system(persona, ref.stage, knowledge, style, ref.system_style))
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + merge_consecutive(turns)


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(
    cid: str,
    model: str,
    analysis: str,
    response: str,
    finish: str,
    usage: dict[str, int],
    show: bool,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": response}
    if show:
        message["reasoning_content"] = analysis
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": finish,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
    }
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    """One server-sent event of the stream, in OpenAI's ``chat.completion.chunk`` form."""
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage_chunk(cid: str, model: str, usage: dict[str, int]) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage,
    }
    return f"data: {json.dumps(body)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def models_body(ids: list[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model_body(model_id) for model_id in ids]}


def model_body(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "persllm"}
