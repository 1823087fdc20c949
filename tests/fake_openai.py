"""A scripted OpenAI-compatible HTTP server on a real socket, for tests and benchmarks.

The code under test is the real HTTP client; only the paid API behind it is replaced. Replies are
queued (text or a ``Fault``) or produced by ``default_reply``; every request body is recorded.

    with FakeOpenAI(latency=0.05) as server:
        server.queue(Fault(status=429, retry_after=1.0), "hello")
        ... OpenAIBackend(LLMConfig(backend="openai", base_url=server.base_url, model="fake")) ...
        assert len(server.requests) == 2

Run as a script for benchmarks: ``python -m tests.fake_openai --port 8001 --latency 0.2``.
Each connection gets its own thread, so latency is applied per request without serialising them.
Replies go out with ``TCP_NODELAY``: otherwise the body, written after the headers, waits for the
client's delayed ACK of them (about 40 ms on Linux), which capped a 0.2 s server at 82% of its rate.
``connections`` counts the connections accepted (keep-alive reuse shows as fewer than requests).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | Callable[[dict[str, Any]], str]


@dataclass
class Fault:
    """One scripted misbehaviour, used for the next request instead of a reply.

    Args:
        status: HTTP status to answer with (429, 500, 401, ...); 200 with ``body`` for a malformed reply.
        retry_after: seconds sent in a ``Retry-After`` header.
        hang: seconds to sleep before answering (to trigger client timeouts); then it answers normally
            (with ``status``/``body`` if given, else the default reply).
        body: raw response body (e.g. ``"not json"``).
    """

    status: int = 200
    retry_after: float | None = None
    hang: float = 0.0
    body: str | None = None


def _words(text: str) -> int:
    return len(text.split())


def _echo(request: dict[str, Any]) -> str:
    users = [m.get("content", "") for m in request.get("messages", []) if m.get("role") == "user"]
    return f"You said: {users[-1] if users else ''}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default (5) refuses connections under a burst of concurrent clients
    owner: FakeOpenAI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # see the module docstring
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._connected()

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            owner = self.server.owner
            data = [{"id": owner.model, "object": "model", "created": 0, "owned_by": "fake"}]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        owner = self.server.owner
        item = owner._record_and_pop(body, dict(self.headers))
        owner._enter()
        try:
            self._answer(body, item)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout): nothing to answer
        finally:
            owner._leave()

    # ------------------------------------------------------------------ answers

    def _answer(self, body: dict[str, Any], item: str | Fault | None) -> None:
        owner = self.server.owner
        if owner.latency and owner._stopping.wait(owner.latency):
            return
        if isinstance(item, Fault):
            if item.hang and owner._stopping.wait(item.hang):
                return
            if item.status != 200 or item.body is not None:
                self._send_fault(item)
                return
            item = None
        text = item if isinstance(item, str) else owner._default(body)
        text, finish = _limit(text, body)
        if body.get("stream"):
            self._send_stream(body, text, finish)
        else:
            self._send_json(200, _completion(body, text, finish, owner.model))

    def _send_fault(self, fault: Fault) -> None:
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        if fault.body is not None:
            self._send_raw(fault.status, fault.body.encode(), "application/json", headers)
        else:
            error = {
                "error": {"message": f"scripted status {fault.status}", "type": "fake", "code": fault.status}
            }
            self._send_json(fault.status, error, headers)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), "application/json", headers or {})

    def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_stream(self, body: dict[str, Any], text: str, finish: str) -> None:
        owner = self.server.owner
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time())}
        base["model"] = body.get("model") or owner.model
        pieces = [{"role": "assistant", "content": ""}]
        pieces += [{"content": part} for part in _split_keep_spaces(text)]
        for delta in pieces:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            self._chunk(f"data: {json.dumps(chunk)}\n\n")
            if owner.stream_delay:
                time.sleep(owner.stream_delay)
        final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
        if (body.get("stream_options") or {}).get("include_usage"):
            final["usage"] = _usage(body, text)
        self._chunk(f"data: {json.dumps(final)}\n\n")
        self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _split_keep_spaces(text: str) -> list[str]:
    parts = text.split(" ")
    return [part + (" " if i < len(parts) - 1 else "") for i, part in enumerate(parts) if part or i == 0]


def _limit(text: str, body: dict[str, Any]) -> tuple[str, str]:
    """Cut the reply at a stop string or at ``max_tokens`` words, like a real server would."""
    stops = body.get("stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(limit, int) and _words(text) > limit:
        return " ".join(text.split()[:limit]), "length"
    return text, "stop"


def _usage(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = sum(_words(str(m.get("content", ""))) for m in body.get("messages", []))
    completion = _words(text)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(body: dict[str, Any], text: str, finish: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": _usage(body, text),
    }


class FakeOpenAI:
    """A scripted OpenAI-compatible server on 127.0.0.1 (context manager).

    Args:
        latency: seconds each request waits before its answer (concurrent requests wait in parallel).
        default_reply: reply when the queue is empty: a string, or a function of the request body.
            Default: ``"You said: <last user message>"``.
        port: 0 picks a free port.
        model: the model name listed by ``GET /v1/models``.
        stream_delay: seconds between streamed chunks.
    """

    def __init__(
        self,
        latency: float = 0.0,
        default_reply: Reply | None = None,
        port: int = 0,
        model: str = "fake-model",
        stream_delay: float = 0.0,
    ) -> None:
        self.latency = latency
        self.default_reply: Reply = default_reply if default_reply is not None else _echo
        self.model = model
        self.stream_delay = stream_delay
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self._port = port
        self._items: deque[str | Fault] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def queue(self, *items: str | Fault) -> None:
        """Script the next replies, in order: reply texts or ``Fault``s."""
        with self._lock:
            self._items.extend(items)

    def start(self) -> FakeOpenAI:
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self._port), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ used by the handler threads

    def _record_and_pop(self, body: dict[str, Any], headers: dict[str, str]) -> str | Fault | None:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            return self._items.popleft() if self._items else None

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _default(self, body: dict[str, Any]) -> str:
        reply = self.default_reply
        return reply(body) if callable(reply) else reply


def main() -> None:
    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible server for benchmarks.")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds per request.")
    parser.add_argument("--reply", default=None, help="Fixed reply text (default: echo the user).")
    args = parser.parse_args()
    with FakeOpenAI(latency=args.latency, default_reply=args.reply, port=args.port) as server:
        print(
            f"fake OpenAI server on {server.base_url} (latency {args.latency}s); Ctrl-C to stop", flush=True
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
