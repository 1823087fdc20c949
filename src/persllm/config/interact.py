"""Settings of chat, serve and converse."""

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from persllm.config.llm import LLMConfig
from persllm.schema import Section

ORIGIN = re.compile(r"https?://[^/\s?#@]+")  # a web origin: scheme and host[:port], nothing after


def _chat_params() -> dict[str, Any]:
    return {"temperature": 0.7, "max_tokens": 256}


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="Port to bind.")
    api_key_env: str | None = Field(None, description="Env var with the bearer token; none = no auth.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted.")
    max_messages: int = Field(64, ge=1, description="Most messages in one request.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_stop_strings: int = Field(4, ge=0, description="Most stop strings in one request (OpenAI allows 4).")
    max_stop_chars: int = Field(
        64, ge=1, description="Longest stop string a request may give, in characters."
    )
    context_tokens: int = Field(2048, ge=128, description="Prompt budget; older turns are trimmed to fit.")
    retrieval: bool = Field(False, description="Add retrieved persona material to the system prompt.")
    params: dict[str, Any] = Field(
        default_factory=_chat_params,
        description="Default sampling of chat and serve (OpenAI names); a request's own values win.",
    )
    show_analysis: bool = Field(False, description="Chat: print the model's analysis before each reply.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port]) whose pages may call the API from a browser; "
        "none = only the server's own page. Requests from any other Origin are refused (403).",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_plain(cls, origins: list[str]) -> list[str]:
        cleaned = [origin.strip().rstrip("/").lower() for origin in origins]
        for origin in cleaned:
            if not ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin; write scheme://host[:port], e.g. https://a.example"
                )
        return cleaned


class AgentConfig(Section):
    persona: str | None = Field(None, description="Persona id this agent speaks as (its trained adapter).")
    stage: str | None = Field(None, description="The persona's stage; default its last stage.")
    model: str = Field(
        "best",
        description="Persona agents: sft, dpo, best (dpo, else sft), prompt (no adapter) or a folder.",
    )
    llm: LLMConfig | None = Field(
        None,
        description="Any backend instead of the local persona model (e.g. an OpenAI-compatible endpoint).",
    )
    name: str | None = Field(None, description="Name shown to the other agents; default the persona's name.")
    system: str | None = Field(None, description="System prompt of an agent without a persona.")

    @model_validator(mode="after")
    def _has_a_model(self) -> "AgentConfig":
        if self.persona is None and self.llm is None:
            raise ValueError("an agent needs `persona` (a local persona model) or `llm` (any backend)")
        return self


class ConverseConfig(Section):
    agents: dict[str, AgentConfig] = Field(
        default_factory=dict,
        description="Named agents usable in --personas besides persona ids and persona:stage:variant ids.",
    )
    judge: LLMConfig | None = Field(
        None, description="Judge for stance agreement and flattery; none = no judge."
    )
    params: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.7, "max_tokens": 160},
        description="Sampling of every turn (OpenAI names); the seed is derived from the project seed.",
    )
    reference_replies: int = Field(
        1, ge=1, description="An agent's first N replies are its stance; later replies are compared to them."
    )
    flattery_lexicon: str | None = Field(
        None,
        description="Text file of flattering phrases (one a line), relative to the project; default bundled.",
    )
    context_tokens: int = Field(2048, ge=128, description="Prompt budget per turn; older turns are trimmed.")
