"""How a stage is marked in the first user turn, and the base vocabulary that decides what a label may be.

Three kinds (``stage_labels.kind``):

- ``text`` (the default): the label is plain text the base tokenizer already splits into its own tokens
  (``<TIME-I> question``). Nothing is added to the vocabulary, so a persona is a plain LoRA adapter that
  any engine serving the base model can load beside others.
- ``reserved``: the label is one special token the base vocabulary already has and leaves unused
  (Llama 3's ``<|reserved_special_token_N|>``, Gemma's ``<unusedN>``, ...). LoRA does not train
  embeddings, so the token keeps the base model's row for it: often untrained, sometimes the same row for
  every reserved token, which conditions nothing (see docs/concepts.md).
- ``new_tokens``: the label becomes a new special token whose embedding and output rows are trained
  (``modules_to_save``). The adapter then carries a copy of both matrices and a larger vocabulary: vLLM
  refuses it, a llama.cpp LoRA cannot carry it, and it is never pooled with other adapters in one base.

This module reads the base vocabulary from files only (tokenizer.json, or a GGUF file's token table),
so loading a project never imports transformers.
"""

import json
import re
from functools import cache
from pathlib import Path

from persllm.bundled import SMOLLM2, smollm2_gguf
from persllm.errors import UserError

ROMAN = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII"]
# Unused special tokens that bases ship for fine-tuning, in the spellings of the common families.
RESERVED_PATTERNS = (
    re.compile(r"^<\|reserved_special_token_(\d+)\|>$"),  # Llama 3
    re.compile(r"^<unused(\d+)>$"),  # Gemma
    re.compile(r"^\[control_(\d+)\]$"),  # Mistral
    re.compile(r"^<\|placeholder(\d+)\|>$"),  # Phi-3
    re.compile(r"^<\|reserved_(\d+)\|>$"),
)


def default_label(index: int) -> str:
    """The default label of the stage at ``index`` (0-based): <TIME-I>, <TIME-II>, ..."""
    numeral = ROMAN[index] if index < len(ROMAN) else str(index + 1)
    return f"<TIME-{numeral}>"


def reserved_tokens(vocabulary: dict[str, bool]) -> list[str]:
    """The reserved (unused) special tokens of a vocabulary (token -> is special), in numeric order."""
    found: list[tuple[int, int, str]] = []
    for token, special in vocabulary.items():
        if not special:
            continue
        for rank, pattern in enumerate(RESERVED_PATTERNS):
            match = pattern.match(token)
            if match:
                found.append((rank, int(match.group(1)), token))
                break
    return [token for _, _, token in sorted(found)]


@cache
def base_vocabulary(model: str) -> dict[str, bool]:
    """token -> is special, for a model folder, a ``.gguf`` file, ``bundled:smollm2`` or a cached hub id.

    Raises:
        UserError: when no tokenizer file can be found for ``model``.
    """

    if model == SMOLLM2:
        return _gguf_vocabulary(smollm2_gguf())
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_vocabulary(path)
    if path.is_dir():
        return _tokenizer_json_vocabulary(path / "tokenizer.json", model)
    cached = _hub_file(model, "tokenizer.json")
    if cached is None:
        raise UserError(
            f"base_model.model: {model!r}: no tokenizer found (not a folder, a .gguf file or a downloaded "
            "hub id); fix the model or download it first"
        )
    return _tokenizer_json_vocabulary(cached, model)


def _tokenizer_json_vocabulary(path: Path, model: str) -> dict[str, bool]:
    if not path.is_file():
        raise UserError(f"base_model.model: {model}: no tokenizer.json; save the tokenizer with the model")
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = {str(token): False for token in (data.get("model") or {}).get("vocab") or {}}
    for added in data.get("added_tokens") or []:
        vocab[str(added["content"])] = bool(added.get("special"))
    return vocab


def _gguf_vocabulary(path: Path) -> dict[str, bool]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    tokens = [bytes(tokens_field.parts[i]).decode("utf-8", "replace") for i in tokens_field.data]
    types = [int(types_field.parts[i][0]) for i in types_field.data] if types_field else [1] * len(tokens)
    special = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED), int(gguf.TokenType.UNUSED)}
    return {token: kind in special for token, kind in zip(tokens, types, strict=True)}


def _hub_file(repo: str, name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - installed with transformers
        return None
    try:
        found = try_to_load_from_cache(repo, name)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def reserved_labels(model: str, given: list[str | None], where: str) -> list[str]:
    """Labels for ``stage_labels.kind: reserved``: each given label must be one token of the base
    vocabulary; the others take the base's reserved tokens in order (skipping the given ones).

    Raises:
        UserError: the base has no reserved tokens, too few of them, or a given label is not one token.
    """
    vocabulary = base_vocabulary(model)
    for label in given:
        if label is not None and label not in vocabulary:
            raise UserError(
                f"{where}: label {label!r} is not one token of the base vocabulary ({model}); with "
                "stage_labels.kind: reserved use one of its reserved tokens, or drop the label"
            )
    pool = [token for token in reserved_tokens(vocabulary) if token not in given]
    needed = sum(label is None for label in given)
    if needed > len(pool):
        have = "has no reserved special tokens" if not pool else f"has only {len(pool)} free reserved tokens"
        raise UserError(
            f"{where}: stage_labels.kind: reserved, but the base model {model} {have}; "
            "use stage_labels.kind: text (the default) or new_tokens"
        )
    free = iter(pool)
    return [label if label is not None else next(free) for label in given]
