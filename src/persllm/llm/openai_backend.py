"""Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama, TGI) over httpx.

At most ``cfg.concurrency`` requests are in flight; 429, 5xx, timeouts, connection errors and
malformed bodies are retried up to ``cfg.max_retries`` times with exponential backoff and full jitter,
waiting at least what a ``Retry-After`` header asks. A slot of the concurrency limit is held while
backing off, so a rate-limited server sees fewer requests, not the same number later.

The ``cfg.concurrency`` keep-alive connections are split over several httpx clients of at most
``SHARD_CONNECTIONS`` each, and a request takes the least busy one. Whenever a request starts or ends,
httpcore's pool rescans its connections (a readability syscall for each idle one, and a scan of all of
them for each idle one: quadratic in the pool size). With 64 connections in one pool that cost 7-10 ms
of CPU per request and capped the client near 100 requests/s on a 0.2 s server; pools of 8 cost about
1 ms per request. The slots still guarantee that no request waits for a connection.
"""

import asyncio
import email.utils
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx

from persllm.config.llm import LLMConfig
from persllm.errors import UserError
from persllm.llm.base import Completion, LLMError, Message, merge_params, stop_list

BACKOFF_BASE = 0.5  # seconds; attempt k waits uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**k))
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 300.0
SENT_PARAMS = ("temperature", "top_p", "max_tokens", "seed", "stop")
SHARD_CONNECTIONS = 8  # connections per httpx client (see the module docstring)
T = TypeVar("T")


class _Retry(Exception):
    """A failure worth another attempt; ``wait`` is the server's Retry-After, if it sent one."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class ClientPool:
    """``size`` keep-alive connections as ``ceil(size / shard)`` httpx clients of near-equal pools.

    ``lease`` hands out the client with the fewest requests in flight. With at most ``size`` leases
    held at once (the backend's slots), a leased client always has a free connection.
    """

    def __init__(self, make: Callable[[httpx.Limits], httpx.AsyncClient], size: int, shard: int) -> None:
        count = max(1, -(-size // max(1, shard)))
        self.per_client = max(1, -(-size // count))
        limits = httpx.Limits(max_connections=self.per_client, max_keepalive_connections=self.per_client)
        self.clients = [make(limits) for _ in range(count)]
        self.busy = [0] * count

    @contextmanager
    def lease(self) -> Iterator[httpx.AsyncClient]:
        index = min(range(len(self.busy)), key=self.busy.__getitem__)
        self.busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.busy[index] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible HTTP server."""

    name = "openai"

    def __init__(self, cfg: LLMConfig) -> None:
        if not cfg.base_url:
            raise UserError(
                f"base_url: the openai backend (model {cfg.model!r}) needs an endpoint; "
                "set base_url, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1"
            )
        self.cfg = cfg
        self.model_id = cfg.model
        self.base_url = cfg.base_url.rstrip("/")
        self.supports_json_schema = cfg.structured_output != "off"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ClientPool | None = None
        self._slots: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ request building

    def body(self, messages: list[Message], params: dict[str, Any], stream: bool = False) -> dict[str, Any]:
        """The JSON body of one chat completion request."""
        merged = merge_params(self.cfg.params, params)
        adapter = merged.get("adapter")
        # A LoRA adapter served by vLLM (--lora-modules name=path) is addressed as a model name.
        model = adapter if adapter and adapter != "base" else self.cfg.model
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        }
        for name in SENT_PARAMS:
            if name in merged:
                body[name] = stop_list(merged[name]) if name == "stop" else merged[name]
        schema = merged.get("response_format")
        if schema and self.supports_json_schema:
            body["response_format"] = response_format(schema)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # ------------------------------------------------------------------ calls

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion:
        body = self.body(messages, params)
        pool, slots = self._session()
        async with slots:
            started = time.perf_counter()
            with pool.lease() as client:
                data = await self._with_retries(lambda: self._post(client, body), body)
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason") or "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            seconds=time.perf_counter() - started,
            extra={"model": data.get("model", body["model"])},
        )

    async def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]:
        """Yield the reply's text as the server streams it (SSE). Retries happen before the first piece."""
        body = self.body(messages, params, stream=True)
        pool, slots = self._session()
        async with slots:
            with pool.lease() as client:  # held while the stream is read: its connection is busy
                response = await self._with_retries(lambda: self._open_stream(client, body), body)
                try:
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            break
                        try:
                            chunk = json.loads(payload)
                        except json.JSONDecodeError:
                            raise LLMError(
                                f"{self.base_url}: malformed stream chunk {payload[:80]!r}"
                            ) from None
                        for choice in chunk.get("choices") or []:
                            piece = (choice.get("delta") or {}).get("content")
                            if piece:
                                yield piece
                except httpx.HTTPError as exc:
                    raise LLMError(
                        f"{self.base_url}: stream broke off ({type(exc).__name__}: {exc})"
                    ) from None
                finally:
                    await response.aclose()

    async def aclose(self) -> None:
        # Clients made on an earlier (closed) loop cannot be closed from this one: drop them.
        if self._pool is not None and self._loop is asyncio.get_running_loop():
            await self._pool.aclose()
        self._pool = None

    # ------------------------------------------------------------------ internals

    def _session(self) -> tuple[ClientPool, asyncio.Semaphore]:
        """Clients and semaphore of the running loop (``run_sync`` makes a new loop each time)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._pool is None or self._slots is None:
            headers = {"Content-Type": "application/json"}
            key = os.environ.get(self.cfg.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            timeout = httpx.Timeout(self.cfg.timeout)
            tls = httpx.create_ssl_context()  # one for all the clients: loading CA certificates takes ~30 ms

            def make(limits: httpx.Limits) -> httpx.AsyncClient:
                return httpx.AsyncClient(
                    base_url=self.base_url, headers=headers, timeout=timeout, limits=limits, verify=tls
                )

            self._pool = ClientPool(make, self.cfg.concurrency, SHARD_CONNECTIONS)
            self._slots = asyncio.Semaphore(self.cfg.concurrency)
            self._loop = loop
        return self._pool, self._slots

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]], body: dict[str, Any]) -> T:
        last = ""
        for number in range(self.cfg.max_retries + 1):
            try:
                return await attempt()
            except _Retry as exc:
                last = str(exc)
                if number == self.cfg.max_retries:
                    break
                await asyncio.sleep(backoff(number, exc.wait))
        raise LLMError(
            f"{self.base_url}: model {body['model']!r} failed after {self.cfg.max_retries + 1} attempts "
            f"({last}); check the server, or raise timeout/max_retries, or lower concurrency"
        )

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise _Retry(f"no answer within {self.cfg.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise _Retry(f"cannot connect: {type(exc).__name__}") from None
        if response.status_code == 400 and "response_format" in body and self.cfg.structured_output == "auto":
            # The server does not do JSON-schema output: ask without it from now on.
            self.supports_json_schema = False
            body.pop("response_format")
            return await self._post(client, body)
        self._check_status(response)
        try:
            data = response.json()
            if not isinstance(data["choices"][0]["message"], dict):
                raise TypeError("message is not an object")
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry(f"malformed reply {response.text[:80]!r}") from None
        return dict(data)

    async def _open_stream(self, client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
        request = client.build_request("POST", "/chat/completions", json=body)
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            raise _Retry(f"no answer within {self.cfg.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise _Retry(f"cannot connect: {type(exc).__name__}") from None
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
        self._check_status(response)
        return response

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retry(f"HTTP {status}", retry_after(response.headers.get("Retry-After")))
        if status in (401, 403):
            raise UserError(
                f"{self.base_url}: HTTP {status} (not authorised); "
                f"put a valid API key in ${self.cfg.api_key_env}"
            )
        if status == 404:
            raise UserError(
                f"{self.base_url}: HTTP 404 for /chat/completions with model {self.cfg.model!r}; "
                "check base_url (usually ends in /v1) and the model name"
            )
        if status >= 400:
            raise LLMError(f"{self.base_url}: HTTP {status}: {error_message(response)}")


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``response_format`` for a JSON schema; an OpenAI-shaped value passes unchanged."""
    if schema.get("type") in ("json_schema", "json_object", "text"):
        return schema
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "reply"))[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def backoff(attempt: int, server_wait: float | None) -> float:
    """Full-jitter exponential backoff, never shorter than the server asked."""
    jitter = random.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
    return jitter if server_wait is None else server_wait + jitter * 0.1


def error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error)[:200]
    except (ValueError, AttributeError):
        return response.text[:200]
