"""The one plug point for language models: ``async generate(messages, params) -> Completion``."""

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

Message = dict[str, str]
T = TypeVar("T")


@dataclass
class Completion:
    """One model reply with its cost."""

    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class ChatBackend(Protocol):
    """A chat model. ``params`` use OpenAI names: temperature, top_p, max_tokens, seed, stop,
    and ``response_format`` (a JSON schema request, honoured where ``supports_json_schema``)."""

    name: str
    model_id: str
    supports_json_schema: bool

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion: ...

    async def aclose(self) -> None: ...


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code (the CLI edges)."""
    return asyncio.run(coro)
