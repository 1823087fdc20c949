"""Whether vLLM's LoRA loader (``vllm serve BASE --enable-lora --lora-modules name=FOLDER``) accepts an
adapter folder: the rules of vLLM 0.33's ``PEFTHelper.validate_legal`` and
``LoRAModel.from_local_checkpoint``, checked from the folder's files alone (no vLLM, no GPU).

A persona trained with ``stage_labels.kind: text`` or ``reserved`` passes; one trained with ``new_tokens``
fails (``modules_to_save`` and a larger vocabulary), which is why that kind is opt-in.
"""

import json
import re
from pathlib import Path
from typing import Any

# --max-lora-rank accepts these values only (vllm/config/lora.py); its default is 16.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The linear layers vLLM wraps with LoRA in Llama- and Qwen2-family models (packed qkv_proj and
# gate_up_proj are matched by their Hugging Face parts), plus the embedding modules' own LoRA form.
VLLM_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)
INIT_NAMES = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
UNSUPPORTED_FLAGS = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")
UNSUPPORTED_SETTINGS = ("alora_invocation_tokens", "layer_replication")
TENSOR_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:lora_A|lora_B)\.weight$")
EMBEDDING_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_[AB]$")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


def vllm_problems(folder: Path, base_vocab: int | None = None) -> list[str]:
    """Everything vLLM would refuse in the adapter ``folder`` (empty: it loads).

    Args:
        folder: a PEFT adapter folder.
        base_vocab: the base model's vocabulary size; when given, an adapter tokenizer with more tokens
            (new stage tokens) is a problem too.
    """
    path = Path(folder) / "adapter_config.json"
    if not path.exists():
        return [f"{path}: missing (vLLM needs adapter_config.json)"]
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    problems = _config_problems(config)
    weights = next((Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).exists()), None)
    if weights is None:
        problems.append("no adapter_model.safetensors (vLLM: the folder doesn't contain tensors)")
    elif weights.suffix == ".safetensors":
        problems += _tensor_problems(weights)
    if base_vocab is not None:
        size = _tokenizer_size(Path(folder))
        if size is not None and size > base_vocab:
            problems.append(
                f"the tokenizer has {size} tokens, the base {base_vocab}: vLLM has no LoRA extra vocabulary"
            )
    return problems


def max_lora_rank(folder: Path) -> int:
    """The smallest ``--max-lora-rank`` that serves the adapter."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    rank = max([int(config.get("r", 0)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])
    return next((r for r in VLLM_RANKS if r >= rank), rank)


def _config_problems(config: dict[str, Any]) -> list[str]:
    required = ("r", "lora_alpha", "target_modules")
    problems = [f"adapter_config.json has no {key!r}" for key in required if key not in config]
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    if any(not isinstance(r, int) or r <= 0 for r in ranks if r is not None):
        problems.append("LoRA rank must be a positive integer")
    elif max((r for r in ranks if isinstance(r, int)), default=0) > VLLM_RANKS[-1]:
        problems.append(f"rank over {VLLM_RANKS[-1]}, the largest --max-lora-rank vLLM accepts")
    saved = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        problems.append(f"modules_to_save {saved} (vLLM loads LoRA weights only)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r} (vLLM: adapter bias is not supported)")
    problems += [f"{flag}: true is not supported by vLLM" for flag in UNSUPPORTED_FLAGS if config.get(flag)]
    problems += [f"{key} is not supported by vLLM" for key in UNSUPPORTED_SETTINGS if config.get(key)]
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and str(init).lower() not in INIT_NAMES:
        problems.append(f"init_lora_weights {init!r} is not supported by vLLM")
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices (vLLM loads LoRA weights only)")
    return problems


def _tensor_problems(weights: Path) -> list[str]:
    from safetensors import safe_open

    problems: list[str] = []
    with safe_open(str(weights), framework="pt") as handle:
        names = list(handle.keys())
    for name in names:
        if name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            continue
        match = TENSOR_NAME.match(name) or EMBEDDING_NAME.match(name)
        if match is None:
            problems.append(f"tensor {name!r} is not a LoRA weight vLLM loads")
        elif match.group("module").rsplit(".", 1)[-1] not in VLLM_MODULES:
            problems.append(f"tensor {name!r} targets a module vLLM does not wrap with LoRA")
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])


def _tokenizer_size(folder: Path) -> int | None:
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    ids = [int(i) for i in ((data.get("model") or {}).get("vocab") or {}).values()]
    ids += [int(t["id"]) for t in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else None
