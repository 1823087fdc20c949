"""Export a trained persona as merged Hugging Face weights, and load trained folders for export.

``run`` writes plain Hugging Face weights, which load with ``AutoModelForCausalLM.from_pretrained(OUT)``
and ``AutoTokenizer.from_pretrained(OUT)`` alone (no PEFT, no persllm): for vLLM, TGI or the Hub. The GGUF
exports for llama.cpp and Ollama are in ``gguf_files``.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

from persllm.config import LLMConfig, Project, Workspace
from persllm.errors import UserError
from persllm.train import common

MARKER = "persllm_export.json"
VARIANTS = ("sft", "dpo")


def run(project: Project, persona_id: str, out: Path, variant: str | None = None) -> dict[str, Any]:
    """Merge ``models/<persona>/<variant>`` into its base weights and save them to ``out``.

    Args:
        project: the loaded project.
        persona_id: which persona.
        out: target folder; it must be new, empty, or an earlier export (which is replaced).
        variant: 'sft' or 'dpo'; None picks dpo when it exists, else sft.

    Returns:
        What was exported: persona, variant, source folder, output folder, stage labels (and their
        token ids where a label is one token), parameter count.
    """
    persona = project.persona(persona_id)
    variant = variant or pick_variant(project.workspace, persona.id)
    if variant not in VARIANTS:
        raise UserError(f"--model {variant}: use one of {', '.join(VARIANTS)}")
    source, _ = common.model_dirs(project.layout, persona.id, variant)
    out = Path(out)
    _check_target(out)

    # Load the trained model with its adapter merged in, and the tokenizer it was trained with.
    model, tokenizer = load_trained(project, persona.id, variant, merge=True)
    labels = {stage.id: str(stage.label) for stage in persona.stages}

    # Write everything into a side folder, then swap it into place.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    info = {
        "persona": persona.id,
        "variant": variant,
        "source": str(source),
        "output": str(out),
        "stage_labels": labels,
        "stage_tokens": common.single_token_ids(tokenizer, list(labels.values())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": common.read_training_json(source),
    }
    (partial / MARKER).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return info


def pick_variant(workspace: Workspace, persona_id: str) -> str:
    for variant in ("dpo", "sft"):
        if common.is_model_folder(common.model_dirs(workspace.layout, persona_id, variant)[0]):
            return variant
    raise UserError(
        f"{workspace.layout.models / persona_id}: no trained model; "
        f"run persllm train sft {workspace.config_path} --persona {persona_id} first"
    )


def load_trained(project: Project, persona_id: str, variant: str, merge: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a trained persona, ready to generate; ``merge`` folds a LoRA adapter in.

    An adapter is loaded onto the model it was trained on (``adapter_base`` in training.json: the base
    model, or the full SFT weights), grown first to the tokenizer's vocabulary (the stage tokens).
    """
    if variant not in VARIANTS:
        raise UserError(f"--model {variant}: use one of {', '.join(VARIANTS)}")
    folder, _ = common.model_dirs(project.layout, persona_id, variant)
    if not common.is_model_folder(folder):
        raise UserError(
            f"{folder}: no trained {variant} model; run persllm train {variant} {project.config_path} "
            f"--persona {persona_id} first"
        )
    return load_folder(project.workspace, project.config.base_model, folder, persona_id, merge)


def load_folder(
    workspace: Workspace, base_model: LLMConfig, folder: Path, persona_id: str, merge: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) of one trained folder of ``persona_id`` (full weights or a LoRA adapter) over
    ``base_model``."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not common.is_adapter(folder):
        model, _ = common.load_pretrained(workspace, base_model, str(folder))
        return model.eval(), tokenizer
    info = common.read_training_json(folder)
    if info.get("adapter_base") == "sft":
        base_name = str(common.model_dirs(workspace.layout, persona_id, "sft")[0])
    else:
        base_name = common.base_model_name(workspace, base_model)
    base, _ = common.load_pretrained(workspace, base_model, base_name)
    common.add_stage_tokens(base, tokenizer, [])
    model = PeftModel.from_pretrained(base, str(folder))
    if merge:
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(
            f"{out}: exists and is not an earlier persllm export; choose a new folder or empty it"
        )
