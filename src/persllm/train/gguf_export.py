"""GGUF files for llama.cpp and Ollama, written with the ``gguf`` package: a base (or merged) model, and a
persona's LoRA adapter in llama.cpp's adapter format.

A model file has what llama.cpp needs: the hyper-parameters, the whole vocabulary (stage tokens added as
``new_tokens`` are control tokens, so ``<TIME-I>`` is one token as in training), the merges and special
ids, the chat template (without the ``{% generation %}`` training markers, which llama.cpp's template
engine does not know) and the tensors under llama.cpp's names. Llama's query and key rows are reordered
from Hugging Face's half-split rotary layout to llama.cpp's interleaved one; Qwen2 uses the half-split
(NEOX) layout and keeps them. Weights are F32, F16 or Q8_0; norms and biases stay F32.

An adapter file holds each LoRA pair as ``<base tensor>.lora_a`` ([r, in]) and ``.lora_b`` ([out, r])
with ``adapter.lora.alpha``; llama.cpp scales it by alpha / r. For Llama the rows of the query and key
``lora_b`` get the same rotary reordering as the base weights they add to.
"""

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from persllm.errors import UserError

FILE_TYPES = ("f16", "f32", "q8_0")
ARCHITECTURES = ("llama", "qwen2")
GENERATION_MARKERS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")
LORA_WEIGHT = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def rotary_order(weights: Any, heads: int) -> Any:
    """Rows of a query/key projection reordered from Hugging Face's half-split rotary layout to
    llama.cpp's interleaved one (``heads``: the projection's own head count)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def pre_tokenizer_name(tokenizer: Any, model_type: str = "llama") -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization: Qwen2's regex, digits split one by one
    (SmolLM) or GPT-2's."""
    if model_type == "qwen2":
        return "qwen2"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = str(getattr(backend, "pre_tokenizer", "")) if backend is not None else ""
    return "smollm" if "Digits" in described else "gpt-2"


def check_file_type(file_type: str) -> None:
    if file_type not in FILE_TYPES:
        raise UserError(f"--gguf-type {file_type!r}: use one of {', '.join(FILE_TYPES)}")


def check_architecture(model_type: str) -> None:
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"--gguf: the model is a {model_type!r}; GGUF export covers Llama-family (SmolLM2, Llama) and "
            "Qwen2-family models; export --merge and convert it with llama.cpp's convert_hf_to_gguf.py"
        )


def arch_of(model_type: str) -> Any:
    import gguf

    return gguf.MODEL_ARCH.QWEN2 if model_type == "qwen2" else gguf.MODEL_ARCH.LLAMA


def encode_tensor(data: Any, file_type: str) -> tuple[Any, Any]:
    """(array, raw dtype or None) of one 2-D weight in ``file_type``; Q8_0 needs rows of 32-multiples
    and falls back to F16 otherwise, as llama.cpp's converter does."""
    import gguf
    import numpy as np

    if file_type == "q8_0" and data.shape[-1] % 32 == 0:
        quant = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), quant), quant
    if file_type in ("f16", "q8_0"):
        return np.ascontiguousarray(data.astype(np.float16)), None
    return np.ascontiguousarray(data.astype(np.float32)), None


def token_table(tokenizer: Any, rows: int) -> tuple[list[str], list[int]]:
    """Every token string and its GGUF type, padded to the embedding's ``rows``."""
    import gguf

    added = {int(i): token for i, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(rows):
        if index < len(tokenizer):
            tokens.append(str(tokenizer.convert_ids_to_tokens(index)))
            token = added.get(index)
            if token is None:
                types.append(int(gguf.TokenType.NORMAL))
            else:
                types.append(int(gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(f"[PAD{index}]")
            types.append(int(gguf.TokenType.UNUSED))
    return tokens, types


def write_gguf(model: Any, tokenizer: Any, out: Path, name: str, file_type: str = "f16") -> dict[str, Any]:
    """Write ``model`` (a transformers Llama or Qwen2, merged) and ``tokenizer`` to the GGUF file ``out``.

    Returns the file's facts: path, bytes, tensor count, vocabulary size, file type, pre-tokenizer.
    """
    import gguf
    import numpy as np

    config = model.config
    check_architecture(config.model_type)
    check_file_type(file_type)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = {key: value.detach().float().cpu().numpy() for key, value in model.state_dict().items()}
    rows = state["model.embed_tokens.weight"].shape[0]
    tied = "lm_head.weight" not in state or np.array_equal(
        state["lm_head.weight"], state["model.embed_tokens.weight"]
    )

    arch = arch_of(config.model_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(rows))
    file_types = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "f32": gguf.LlamaFileType.ALL_F32,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(int(file_types[file_type]))

    # Vocabulary: tokens and types from the tokenizer itself, merges and special ids from its files.
    pre = pre_tokenizer_name(tokenizer, config.model_type)
    tokens, types = token_table(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        special = gguf.SpecialVocab(scratch, load_merges=True, n_vocab=rows)
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        special.chat_template = GENERATION_MARKERS.sub("", template) if template else None
        special.add_to_gguf(writer)

    # Tensors under llama.cpp's names; Llama's q/k rows reordered for its rotary embedding.
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    written = 0
    for key, data in state.items():
        if (key == "lm_head.weight" and tied) or "rotary_emb" in key:
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"--gguf: no llama.cpp name for tensor {key!r}; this model cannot be exported")
        if config.model_type == "llama" and key.endswith("q_proj.weight"):
            data = rotary_order(data, heads)
        elif config.model_type == "llama" and key.endswith("k_proj.weight"):
            data = rotary_order(data, kv_heads)
        if data.ndim == 2 and not key.endswith("norm.weight"):
            array, raw = encode_tensor(data, file_type)
            writer.add_tensor(target, array, raw_dtype=raw)
        else:
            writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))
        written += 1
    _finish(writer, partial, out)
    return {
        "gguf": str(out),
        "bytes": out.stat().st_size,
        "tensors": written,
        "vocab": rows,
        "file_type": file_type,
        "pre_tokenizer": pre,
    }


def write_lora_gguf(
    adapter: Path, config: Any, out: Path, name: str, file_type: str = "f16"
) -> dict[str, Any]:
    """Write the PEFT LoRA adapter folder ``adapter`` as a llama.cpp LoRA adapter for a base with ``config``.

    Args:
        adapter: a plain LoRA adapter (no ``modules_to_save``: a llama.cpp adapter cannot grow the
            vocabulary or replace whole modules).
        config: the base model's transformers config (architecture, heads, layers).
        file_type: f32 keeps the adapter exact; f16 and q8_0 write F16 pairs (a rank below 32 cannot be
            Q8_0 blocks).

    Returns:
        The file's facts: path, bytes, LoRA pairs, rank, alpha, file type.
    """
    import gguf
    from safetensors.numpy import load_file

    check_architecture(config.model_type)
    check_file_type(file_type)
    settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("modules_to_save") or settings.get("trainable_token_indices"):
        raise UserError(
            f"{adapter}: the adapter saves whole modules ({settings.get('modules_to_save')}), as training "
            "with stage_labels.kind: new_tokens does; a llama.cpp LoRA cannot carry them: export --gguf "
            "NAME.gguf (one merged file) instead"
        )
    if settings.get("rank_pattern") or settings.get("alpha_pattern") or settings.get("use_dora"):
        raise UserError(f"{adapter}: per-module ranks or DoRA have no llama.cpp LoRA form; merge instead")
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    if settings.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # llama.cpp scales by alpha / r; rsLoRA means alpha / sqrt(r)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        match = LORA_WEIGHT.match(key)
        if match is None:
            raise UserError(f"{adapter}: tensor {key!r} is not a LoRA weight; a llama.cpp adapter has none")
        pairs.setdefault(match.group("module"), {})[match.group("part")] = tensor.astype("float32")

    arch = arch_of(config.model_type)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    pair_type = "f32" if file_type == "f32" else "f16"
    for module, pair in sorted(pairs.items()):
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or set(pair) != {"A", "B"}:
            raise UserError(f"{adapter}: no llama.cpp tensor for LoRA module {module!r}; merge instead")
        lora_a, lora_b = pair["A"], pair["B"]
        if config.model_type == "llama" and module.endswith("q_proj"):
            lora_b = rotary_order(lora_b, heads)
        elif config.model_type == "llama" and module.endswith("k_proj"):
            lora_b = rotary_order(lora_b, kv_heads)
        writer.add_tensor(target + ".lora_a", encode_tensor(lora_a, pair_type)[0])
        writer.add_tensor(target + ".lora_b", encode_tensor(lora_b, pair_type)[0])
    _finish(writer, partial, out)
    return {
        "gguf": str(out),
        "bytes": out.stat().st_size,
        "pairs": len(pairs),
        "rank": rank,
        "alpha": alpha,
        "file_type": pair_type,
    }


def _finish(writer: Any, partial: Path, out: Path) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)


def modelfile_text(
    gguf_name: str, system: str, label: str | None, chatml: bool, note: str, adapter: str | None = None
) -> str:
    """An Ollama ``Modelfile`` for the exported file (and the persona's LoRA ``adapter`` file on it): the
    persona's system prompt and, for ChatML models, a template that puts the stage label before the
    first user turn, as in training."""
    lines = [f"# {note}", f"FROM ./{gguf_name}"]
    lines += [f"ADAPTER ./{adapter}"] if adapter else []
    lines += [f'SYSTEM """{system}"""']
    if chatml:
        prefix = f"{label} " if label else ""
        lines += [
            'TEMPLATE """{{- $labelled := false }}{{- if .System }}<|im_start|>system',
            "{{ .System }}<|im_end|>",
            '{{ end }}{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}',
            '{{ if and (eq .Role "user") (not $labelled) }}{{ $labelled = true }}'
            + prefix
            + "{{ end }}{{ .Content }}<|im_end|>",
            "{{ end }}{{ end }}<|im_start|>assistant",
            '"""',
            'PARAMETER stop "<|im_end|>"',
        ]
    return "\n".join(lines) + "\n"


def rope_theta(config: Any) -> float:
    """The rotary base: ``rope_theta``, or transformers 5's ``rope_parameters``."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        parameters = getattr(config, "rope_parameters", None) or {}
        theta = parameters.get("rope_theta", 10000.0)
    return float(theta)
