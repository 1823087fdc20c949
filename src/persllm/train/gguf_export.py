"""A merged Llama-family model as one GGUF file for llama.cpp and Ollama, written with the ``gguf`` package.

What llama.cpp needs is all here: the hyper-parameters, the whole vocabulary (the stage tokens are control
tokens, so ``<TIME-I>`` in a prompt is one token as in training), the merges and special ids, the chat
template (without the ``{% generation %}`` training markers, which llama.cpp's template engine does not
know) and the tensors under llama.cpp's names, with the query and key rows reordered for its rotary
embedding. Weights are written as F16 (or F32); norms stay F32.
"""

import re
import tempfile
from pathlib import Path
from typing import Any

from persllm.errors import UserError

FILE_TYPES = ("f16", "f32")
GENERATION_MARKERS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def rotary_order(weights: Any, heads: int) -> Any:
    """Rows of a query/key projection reordered from Hugging Face's half-split rotary layout to
    llama.cpp's interleaved one (``heads``: the projection's own head count)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization: digits split one by one (SmolLM) or GPT-2's."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    described = str(getattr(backend, "pre_tokenizer", "")) if backend is not None else ""
    return "smollm" if "Digits" in described else "gpt-2"


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
    """Write ``model`` (a merged transformers Llama) and ``tokenizer`` to the GGUF file ``out``.

    Returns the file's facts: path, bytes, tensor count, vocabulary size, file type, pre-tokenizer.
    """
    import gguf
    import numpy as np

    config = model.config
    if config.model_type != "llama":
        raise UserError(
            f"--gguf: the model is a {config.model_type!r}; GGUF export covers Llama-family models "
            "(SmolLM2, Llama); export --merge and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if file_type not in FILE_TYPES:
        raise UserError(f"--gguf-type {file_type!r}: use one of {', '.join(FILE_TYPES)}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = {key: value.detach().float().cpu().numpy() for key, value in model.state_dict().items()}
    rows = state["model.embed_tokens.weight"].shape[0]
    tied = "lm_head.weight" not in state or np.array_equal(
        state["lm_head.weight"], state["model.embed_tokens.weight"]
    )

    arch = gguf.MODEL_ARCH.LLAMA
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
    writer.add_file_type(
        int(gguf.LlamaFileType.MOSTLY_F16 if file_type == "f16" else gguf.LlamaFileType.ALL_F32)
    )

    # Vocabulary: tokens and types from the tokenizer itself, merges and special ids from its files.
    pre = pre_tokenizer_name(tokenizer)
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

    # Tensors under llama.cpp's names; q/k rows reordered for its rotary embedding.
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    written = 0
    for key, data in state.items():
        if key == "lm_head.weight" and tied:
            continue
        if "rotary_emb" in key:
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"--gguf: no llama.cpp name for tensor {key!r}; this model cannot be exported")
        if key.endswith("q_proj.weight"):
            data = rotary_order(data, heads)
        elif key.endswith("k_proj.weight"):
            data = rotary_order(data, kv_heads)
        if file_type == "f16" and data.ndim == 2:
            data = data.astype(np.float16)
        writer.add_tensor(target, np.ascontiguousarray(data))
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    return {
        "gguf": str(out),
        "bytes": out.stat().st_size,
        "tensors": written,
        "vocab": rows,
        "file_type": file_type,
        "pre_tokenizer": pre,
    }


def modelfile_text(gguf_name: str, system: str, label: str | None, chatml: bool, note: str) -> str:
    """An Ollama ``Modelfile`` for the exported file: the persona's system prompt and, for ChatML models,
    a template that puts the stage label before the first user turn, as in training."""
    lines = [f"# {note}", f"FROM ./{gguf_name}", f'SYSTEM """{system}"""']
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
