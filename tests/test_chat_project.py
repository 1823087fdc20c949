"""A small real project for the chat, converse and serve tests (and benchmarks/serve.py).

Two personas, two stages each, on the tiny Llama of ``tests/tiny.py``; each persona gets a real PEFT
LoRA adapter saved like training saves it (a plain adapter with text stage labels, or, for the personas
named in ``grown``, one trained with new stage tokens: tokenizer grown, embeddings saved), with random
LoRA weights so the personas answer differently.
"""

from pathlib import Path
from typing import Any

import yaml

PERSONAS: dict[str, dict[str, Any]] = {
    "elsie": {
        "name": "Elsie Wren",
        "profile": "A lighthouse keeper's daughter, precise and dry.",
        "stages": [("keeper", "It is 1889, at Skerrow Point."), ("engineer", "It is 1905, in Carrow Bay.")],
        "text": "The lamp at Skerrow Point burns paraffin. I keep the log of every storm.",
    },
    "jonah": {
        "name": "Jonah Pell",
        "profile": "A schoolmaster, thrifty and fond of proverbs.",
        "stages": [
            ("schoolmaster", "It is 1886, in the schoolroom."),
            ("mayor", "It is 1905, at the town hall."),
        ],
        "text": "Patience is the mother of learning. The harbour scheme costs too much.",
    },
}


def write_project(root: Path, base_model: Path, serve: dict[str, Any] | None = None, **extra: Any) -> Path:
    """``root/persllm.yaml`` with the two personas and their corpus files; returns the project file."""
    for pid, spec in PERSONAS.items():
        stages = []
        for sid, time in spec["stages"]:
            folder = root / "corpus" / pid / sid
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "knowledge.md").write_text(
                f"{spec['text']}\n\nIn {sid} days: {time}\n", encoding="utf-8"
            )
            (folder / "style.txt").write_text(f"{spec['text']}\n", encoding="utf-8")
            stages.append(
                {
                    "id": sid,
                    "time": time,
                    "knowledge": [f"../corpus/{pid}/{sid}/*.md"],
                    "style": [f"../corpus/{pid}/{sid}/*.txt"],
                }
            )
        persona = {"id": pid, "name": spec["name"], "profile": spec["profile"], "stages": stages}
        (root / "personas").mkdir(parents=True, exist_ok=True)
        (root / "personas" / f"{pid}.yaml").write_text(yaml.safe_dump(persona), encoding="utf-8")
    config = {
        "project": "talk",
        "personas": ["personas/*.yaml"],
        "base_model": {"model": str(base_model), "params": {"temperature": 0.0, "max_tokens": 16}},
        "serve": {"params": {"temperature": 0.0, "max_tokens": 16}, **(serve or {})},
        **extra,
    }
    path = root / "persllm.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def make_adapter(base_model: Path, out: Path, labels: list[str], seed: int, new_tokens: bool = False) -> Path:
    """A LoRA adapter on ``base_model`` saved as training saves one, with random weights.

    With ``new_tokens``, as ``stage_labels.kind: new_tokens`` trains: the stage labels become special
    tokens (new embedding rows), the (tied) embeddings are trained as ``modules_to_save``, and only the
    adapter's own copies are written. Otherwise a plain LoRA adapter (the default kind, text labels).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.train.common import add_stage_tokens, tied_embeddings

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    grown: dict[str, Any] = {}
    if new_tokens:
        add_stage_tokens(model, tokenizer, labels)
        grown = {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": tied_embeddings(model)}
    lora = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM", **grown
    )
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.6)
            elif "modules_to_save" in name:  # the persona's own embedding rows, as after training
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    return out


def build_project(
    root: Path,
    base_model: Path,
    variants: tuple[str, ...] = ("sft",),
    grown: tuple[str, ...] = (),
    **kwargs: Any,
) -> Path:
    """The project plus ``models/<persona>/<variant>`` adapters for every persona (dpo only for elsie);
    the personas in ``grown`` were trained with new stage tokens."""
    path = write_project(root, base_model, **kwargs)
    for index, pid in enumerate(PERSONAS):
        for offset, variant in enumerate(variants):
            if variant == "dpo" and pid != "elsie":
                continue
            out = root / "runs" / "talk" / "models" / pid / variant
            make_adapter(base_model, out, ["<TIME-I>", "<TIME-II>"], 10 * index + offset, pid in grown)
    return path


# ---------------------------------------------------------------------- the builder's own checks


def test_project_loads_and_lists_adapters(tmp_path: Path, tiny_model_dir: Path) -> None:
    from persllm.config import load_project
    from persllm.interact.models import list_model_ids

    project = load_project(build_project(tmp_path, tiny_model_dir, variants=("sft", "dpo")))
    ids = list_model_ids(project)
    assert ids[0] == "base"
    assert "elsie:keeper:dpo" in ids and "elsie:engineer:sft" in ids and "jonah:mayor:sft" in ids
    assert "jonah:mayor:dpo" not in ids
    assert "jonah:schoolmaster:prompt" in ids
    saved = tmp_path / "runs" / "talk" / "models" / "elsie" / "sft"
    assert (saved / "adapter_config.json").exists()
    assert "<TIME-II>" not in (saved / "tokenizer.json").read_text(encoding="utf-8")  # a plain adapter
