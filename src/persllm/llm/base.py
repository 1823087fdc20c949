"""The one plug point for language models: ``async generate(messages, params) -> Completion``."""

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from persllm.errors import UserError

Message = dict[str, str]
T = TypeVar("T")

# Params that change what the model writes; everything else (timeouts, tags) never reaches the cache key.
OUTPUT_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "stop",
    "response_format",
    "logprobs",
    "top_logprobs",
)


class LLMError(UserError):
    """A model call that failed for good (retries exhausted, unusable replies).

    It is a ``UserError`` so the CLI prints one line (usually the fix is on the user's side: start the
    server, lower the concurrency, pick another model) instead of a traceback.
    """


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
    and ``response_format`` (a JSON schema request, honoured where ``supports_json_schema``).

    Extra keys callers may add: ``adapter`` (a LoRA adapter name: transformers, or a served LoRA
    model name: openai), ``n_sample`` (a sample index: part of the cache key, never sent) and
    ``tag`` (the cache log's tag, never sent).
    """

    @property
    def name(self) -> str: ...

    @property
    def model_id(self) -> str: ...

    @property
    def supports_json_schema(self) -> bool: ...

    async def generate(self, messages: list[Message], params: dict[str, Any]) -> Completion: ...

    def stream(self, messages: list[Message], params: dict[str, Any]) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


# Adapter names every local backend understands: "base" switches adapters off; "default" is cfg.adapter.
BASE_ADAPTER = "base"
DEFAULT_ADAPTER = "default"


def pick_adapter(params: dict[str, Any], loaded: list[str]) -> str | None:
    """The adapter a call uses among ``loaded``: its ``adapter`` param, else the default one, else none."""
    name = params.get("adapter")
    if name is None:
        return DEFAULT_ADAPTER if DEFAULT_ADAPTER in loaded else None
    if name == BASE_ADAPTER:
        return None
    if name not in loaded:
        known = ", ".join([BASE_ADAPTER, *sorted(loaded)])
        raise UserError(f"adapter {name!r} is not loaded; use one of: {known} (or add_adapter it first)")
    return str(name)


def merge_params(defaults: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    """The config's default params overridden by one call's params (``None`` values drop a default)."""
    merged = {**defaults, **(params or {})}
    return {key: value for key, value in merged.items() if value is not None}


def stop_list(stop: Any) -> list[str]:
    """OpenAI's ``stop`` (a string or a list) as a list of non-empty strings."""
    if not stop:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else list(stop)) if s]


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous code (the CLI edges)."""
    return asyncio.run(coro)
