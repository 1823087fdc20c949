"""Chat backends: the one plug point for models. ``make_backend(cfg, cache)`` gives a ``ChatBackend``.

``BACKENDS`` maps ``LLMConfig.backend`` to a class; with a ``CallCache`` every call goes through it.
"""

from typing import Any

from persllm.config.llm import LLMConfig
from persllm.errors import UserError
from persllm.llm.base import ChatBackend, Completion, LLMError, Message, merge_params, run_sync
from persllm.llm.cache import CachedBackend, CallCache, open_cache
from persllm.llm.llamacpp_backend import LlamaCppBackend
from persllm.llm.openai_backend import OpenAIBackend
from persllm.llm.transformers_backend import TransformersBackend

BACKENDS: dict[str, Any] = {
    "openai": OpenAIBackend,
    "transformers": TransformersBackend,
    "llamacpp": LlamaCppBackend,
}


def make_backend(cfg: LLMConfig, cache: CallCache | None = None, tag: str | None = None) -> ChatBackend:
    """The backend ``cfg`` names, wrapped by ``cache`` when one is given (``tag`` labels its log rows)."""
    if cfg.backend not in BACKENDS:
        raise UserError(f"backend: unknown {cfg.backend!r}; use one of: {', '.join(BACKENDS)}")
    backend: ChatBackend = BACKENDS[cfg.backend](cfg)
    return CachedBackend(backend, cache, tag) if cache is not None else backend


__all__ = [
    "BACKENDS",
    "CachedBackend",
    "CallCache",
    "ChatBackend",
    "Completion",
    "LLMConfig",
    "LLMError",
    "LlamaCppBackend",
    "Message",
    "OpenAIBackend",
    "TransformersBackend",
    "make_backend",
    "merge_params",
    "open_cache",
    "run_sync",
]
