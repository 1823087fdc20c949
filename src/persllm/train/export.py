"""Export a trained persona: adapter merged, stage tokens and template kept.

``run`` writes plain Hugging Face weights, which load with ``AutoModelForCausalLM.from_pretrained(OUT)``
and ``AutoTokenizer.from_pretrained(OUT)`` alone (no PEFT, no persllm): for vLLM, TGI or the Hub.
``run_gguf`` writes one GGUF file for llama.cpp (persllm's ``llamacpp`` backend included) and an Ollama
``Modelfile`` beside it.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

from persllm.config import Project
from persllm.errors import UserError
from persllm.llm.bundled import SMOLLM2
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
        What was exported: persona, variant, source folder, output folder, stage tokens, parameter count.
    """
    persona = project.persona(persona_id)
    variant = variant or pick_variant(project, persona.id)
    source, _ = common.model_dirs(project, persona.id, variant)
    out = Path(out)
    _check_target(out)

    # Load the trained model with its adapter merged in, and the tokenizer it was trained with.
    model, tokenizer = load_trained(project, persona.id, variant, merge=True)
    stage_tokens = {
        str(stage.label): int(tokenizer.convert_tokens_to_ids(stage.label)) for stage in persona.stages
    }

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
        "stage_tokens": stage_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": common.read_training_json(source),
    }
    (partial / MARKER).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return info


def run_gguf(
    project: Project,
    persona_id: str,
    out: Path,
    variant: str | None = None,
    file_type: str = "f16",
    stage: str | None = None,
) -> dict[str, Any]:
    """Merge the persona's ``variant`` and write it as the GGUF file ``out`` plus ``<out>.Modelfile``.

    Args:
        stage: the stage the Modelfile speaks at (its system prompt and label); default the latest.

    Returns:
        What was exported: persona, variant, gguf path, Modelfile path, bytes, stage tokens, file type.
    """
    from persllm.curate.format import system_prompt
    from persllm.train.gguf_export import modelfile_text, write_gguf

    persona = project.persona(persona_id)
    stage_cfg = persona.stage(stage) if stage else persona.stages[-1]
    out = Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"--gguf {out}: name the output file NAME.gguf")
    modelfile = out.with_name(out.stem + ".Modelfile")
    if out.exists() and not modelfile.exists():
        raise UserError(f"{out}: exists and is not an earlier persllm export; choose a new file name")
    variant = variant or pick_variant(project, persona.id)
    source, _ = common.model_dirs(project, persona.id, variant)
    model, tokenizer = load_trained(project, persona.id, variant, merge=True)
    stage_tokens = {
        str(s.label): int(tokenizer.convert_tokens_to_ids(s.label)) for s in persona.stages if s.label
    }
    facts = write_gguf(model, tokenizer, out, f"{persona.name} ({variant})", file_type)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    note = (
        f"persllm export: {persona.name} ({variant}) at stage {stage_cfg.id}. "
        f"Create it with: ollama create {persona.id}-{stage_cfg.id} -f {modelfile.name}"
    )
    text = modelfile_text(
        out.name,
        system_prompt(persona, stage_cfg, common.system_style(source)),
        stage_cfg.label,
        "<|im_start|>" in template,
        note,
    )
    modelfile.write_text(text, encoding="utf-8")
    return {
        "persona": persona.id,
        "variant": variant,
        "source": str(source),
        "stage": stage_cfg.id,
        "modelfile": str(modelfile),
        "stage_tokens": stage_tokens,
        **facts,
    }


def pick_variant(project: Project, persona_id: str) -> str:
    for variant in ("dpo", "sft"):
        if common.is_model_folder(common.model_dirs(project, persona_id, variant)[0]):
            return variant
    raise UserError(
        f"{project.run_dir / 'models' / persona_id}: no trained model; "
        f"run persllm train sft {project.config_path} --persona {persona_id} first"
    )


def load_trained(project: Project, persona_id: str, variant: str, merge: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of a trained persona, ready to generate; ``merge`` folds a LoRA adapter in.

    An adapter is loaded onto the model it was trained on (``adapter_base`` in training.json: the base
    model, or the full SFT weights), grown first to the tokenizer's vocabulary (the stage tokens).
    """
    if variant not in VARIANTS:
        raise UserError(f"--model {variant}: use one of {', '.join(VARIANTS)}")
    folder, _ = common.model_dirs(project, persona_id, variant)
    if not common.is_model_folder(folder):
        raise UserError(
            f"{folder}: no trained {variant} model; run persllm train {variant} {project.config_path} "
            f"--persona {persona_id} first"
        )
    return load_folder(project, folder, persona_id, merge)


def load_folder(project: Project, folder: Path, persona_id: str, merge: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of one trained folder of ``persona_id`` (full weights or a LoRA adapter)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not common.is_adapter(folder):
        model, _ = common.load_pretrained(project, str(folder))
        return model.eval(), tokenizer
    info = common.read_training_json(folder)
    if info.get("adapter_base") == "sft":
        base_name = str(common.model_dirs(project, persona_id, "sft")[0])
    else:
        base_name = common.base_model_name(project)
    base, _ = common.load_pretrained(project, base_name)
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


# --------------------------------------------------------------------------- GGUF for generation

GENERATION_GGUF = "persllm-generation.f16.gguf"


def generation_gguf(project: Project, persona_id: str | None = None, folder: Path | None = None) -> Path:
    """The GGUF file ``base_model.backend: llamacpp`` generates with, exported (F16) on first use.

    ``folder`` is a trained model of ``persona_id``: its merged GGUF lives inside it, so retraining
    (which replaces the folder) drops it. Without a folder it is the base model: a ``.gguf`` model or
    ``bundled:smollm2`` is used as it is; a Hugging Face model is exported under ``models/``. A file is
    exported again when the weights it came from have changed since.
    """
    from persllm.llm.llamacpp_backend import gguf_path
    from persllm.llm.transformers_backend import weights_fingerprint
    from persllm.train.gguf_export import write_gguf

    model = project.config.base_model.model
    if folder is None and (model == SMOLLM2 or model.endswith(".gguf")):
        return gguf_path(model)
    source = Path(folder) if folder is not None else Path(common.base_model_name(project))
    out = source / GENERATION_GGUF if folder is not None else project.run_dir / "models" / GENERATION_GGUF
    stamp = out.with_name(out.name + ".json")
    made_from = weights_fingerprint(source) if source.exists() else model
    if out.exists() and stamp.exists() and json.loads(stamp.read_text()).get("source") == made_from:
        return out
    if folder is not None:
        if persona_id is None:
            raise ValueError("a trained folder's GGUF needs its persona")
        trained, tokenizer = load_folder(project, source, persona_id, merge=True)
        name = f"{project.persona(persona_id).name} ({source.name})"
    else:
        trained, tokenizer = common.load_pretrained(project, str(source))
        name = model
    write_gguf(trained, tokenizer, out, name, "f16")
    stamp.write_text(json.dumps({"source": made_from}) + "\n", encoding="utf-8")
    return out
