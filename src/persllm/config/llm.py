"""Which chat model to call and how: shared by the annotator, the base model, judges and agents."""

from typing import Any, Literal

from pydantic import Field, field_validator

from persllm.schema import Section


class LLMConfig(Section):
    backend: Literal["transformers", "llamacpp", "openai"] = Field(
        "transformers",
        description="'transformers' runs a model in-process (and trains it); 'llamacpp' runs a .gguf file "
        "in-process with llama.cpp (parallel slots, JSON-schema grammars); 'openai' calls any "
        "OpenAI-compatible endpoint. As base_model, 'llamacpp' still trains in transformers and generates "
        "(eval, chat, serve, converse) from GGUF exports of the base and of each trained persona.",
    )
    model: str = Field(
        "bundled:smollm2",
        description="Model: a local folder, a hub id, a .gguf file, 'bundled:smollm2', or a served name.",
    )
    adapter: str | None = Field(None, description="Optional LoRA adapter folder (transformers backend).")
    base_url: str | None = Field(
        None, description="Endpoint base URL for 'openai', e.g. http://127.0.0.1:8000/v1."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key ('openai')."
    )
    params: dict[str, Any] = Field(
        default_factory=lambda: {"temperature": 0.7, "max_tokens": 384},
        description="Sampling parameters in OpenAI names: temperature, top_p, max_tokens, seed, stop.",
    )
    concurrency: int = Field(
        4,
        ge=1,
        description="Requests in flight at once ('openai'), batch size ('transformers') or parallel "
        "slots ('llamacpp').",
    )
    timeout: float = Field(120.0, gt=0, description="Seconds before one request is abandoned and retried.")
    max_retries: int = Field(5, ge=0, description="Retries on 429, 5xx, timeouts and connection errors.")
    structured_output: Literal["auto", "json_schema", "off"] = Field(
        "auto", description="Ask for JSON-schema output: auto = when the backend supports it."
    )
    device: str = Field("auto", description="Local device: auto, cpu, cuda, cuda:1, mps.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Local weights dtype: auto = bfloat16 on GPU, float32 on CPU."
    )

    @field_validator("structured_output", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false; the user meant the string.
        return "off" if value is False else value
