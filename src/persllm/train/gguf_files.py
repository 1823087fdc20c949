"""The GGUF files a project gives llama.cpp and Ollama: one base file and a small LoRA adapter file per
persona, or (for a persona that cannot be an adapter of the base) one merged file of its own.

A persona is an adapter of the base when its folder is a plain LoRA adapter trained on the base model
(``stage_labels.kind: text`` or ``reserved``). One trained with ``new_tokens`` grows the vocabulary, and
a DPO adapter on full SFT weights sits on another model; both are exported merged.

``export_dir`` is ``persllm export --gguf DIR``; ``export_merged`` is ``persllm export --gguf NAME.gguf``;
``generation_base`` and ``generation_adapter`` are the files ``base_model.backend: llamacpp`` generates
with, exported on first use and again whenever the weights they came from change.
"""

import json
from pathlib import Path
from typing import Any

from persllm.bundled import SMOLLM2
from persllm.config import LLMConfig, Project, Workspace
from persllm.errors import UserError
from persllm.layout import GENERATION_GGUF
from persllm.llm.llamacpp_backend import gguf_path
from persllm.llm.transformers_backend import saves_modules, weights_fingerprint
from persllm.prompting import system_prompt
from persllm.train import common
from persllm.train.export import load_folder, pick_variant
from persllm.train.gguf_export import check_file_type, modelfile_text, write_gguf, write_lora_gguf

MARKER = "persllm_gguf.json"
BASE_FILE = "base.gguf"


def is_base_adapter(folder: Path) -> bool:
    """Whether a trained folder is a plain LoRA adapter of the base model (a llama.cpp LoRA can carry it)."""
    info = common.read_training_json(folder)
    return common.is_adapter(folder) and not saves_modules(str(folder)) and info.get("adapter_base") != "sft"


def export_dir(
    project: Project,
    out: Path,
    personas: list[str] | None = None,
    variant: str | None = None,
    file_type: str = "f16",
    stage: str | None = None,
) -> dict[str, Any]:
    """Write ``out/base.gguf`` and, per persona, ``<persona>-<variant>.lora.gguf`` (or a merged
    ``<persona>-<variant>.gguf``) with an Ollama ``<persona>.Modelfile``.

    The base is written once: an earlier export of the same base weights and type is kept. ``out`` must
    be new, empty or an earlier ``--gguf DIR`` export; files are written beside and then renamed, so a
    failure leaves what was there.

    Returns:
        What was written: the base file and, per persona, its variant, form (lora or merged), file,
        bytes and Modelfile.
    """
    check_file_type(file_type)
    ids = personas or list(project.personas)
    chosen = {pid: variant or pick_variant(project.workspace, project.persona(pid).id) for pid in ids}
    _check_dir(out)
    marker = _read_marker(out)
    base_name = common.base_model_name(project.workspace, project.config.base_model)
    base_source = f"{_fingerprint(Path(base_name))}:{file_type}"
    results: list[dict[str, Any]] = []
    base_info: dict[str, Any] | None = None
    for pid, var in chosen.items():
        folder, _ = common.model_dirs(project.layout, pid, var)
        if not common.is_model_folder(folder):
            raise UserError(f"{folder}: no trained {var} model; run persllm train {var} first")
        if is_base_adapter(folder):
            if base_info is None:
                base_info = _base_file(project, out, base_name, base_source, file_type, marker)
            name = f"{pid}-{var}.lora.gguf"
            facts = write_lora_gguf(
                folder,
                _base_config(project.workspace, project.config.base_model),
                out / name,
                f"{pid} ({var})",
                file_type,
            )
            results.append(_modelfile(project, pid, var, folder, out, BASE_FILE, name, stage) | facts)
        else:
            name = f"{pid}-{var}.gguf"
            model, tokenizer = load_folder(
                project.workspace, project.config.base_model, folder, pid, merge=True
            )
            facts = write_gguf(model, tokenizer, out / name, f"{pid} ({var})", file_type)
            results.append(_modelfile(project, pid, var, folder, out, name, None, stage) | facts)
    marker = {"base": base_info or marker.get("base"), "personas": {r["persona"]: r for r in results}}
    (out / MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n", encoding="utf-8")
    return {"base": base_info, "personas": results}


def export_merged(
    project: Project,
    persona_id: str,
    out: Path,
    variant: str | None = None,
    file_type: str = "f16",
    stage: str | None = None,
) -> dict[str, Any]:
    """Merge the persona's ``variant`` into one GGUF file ``out`` plus ``<out>.Modelfile``."""
    check_file_type(file_type)
    persona = project.persona(persona_id)
    stage_cfg = persona.stage(stage) if stage else persona.stages[-1]
    out = Path(out)
    modelfile = out.with_name(out.stem + ".Modelfile")
    if out.exists() and not modelfile.exists():
        raise UserError(f"{out}: exists and is not an earlier persllm export; choose a new file name")
    variant = variant or pick_variant(project.workspace, persona.id)
    source, _ = common.model_dirs(project.layout, persona.id, variant)
    if not common.is_model_folder(source):
        raise UserError(f"{source}: no trained {variant} model; run persllm train {variant} first")
    model, tokenizer = load_folder(
        project.workspace, project.config.base_model, source, persona.id, merge=True
    )
    labels = [str(s.label) for s in persona.stages]
    facts = write_gguf(model, tokenizer, out, f"{persona.name} ({variant})", file_type)
    _write_modelfile(project, persona.id, variant, source, modelfile, out.name, None, stage_cfg.id)
    return {
        "persona": persona.id,
        "variant": variant,
        "source": str(source),
        "stage": stage_cfg.id,
        "modelfile": str(modelfile),
        "stage_tokens": common.single_token_ids(tokenizer, labels),
        **facts,
    }


# --------------------------------------------------------------------------- files for generation


def generation_base(workspace: Workspace, base_model: LLMConfig) -> Path:
    """The base GGUF ``base_model.backend: llamacpp`` runs: a ``.gguf`` model or ``bundled:smollm2`` as it
    is, a Hugging Face model exported (F16) under ``models/`` on first use."""

    model = base_model.model
    if model == SMOLLM2 or model.endswith(".gguf"):
        return gguf_path(model)
    source = Path(common.base_model_name(workspace, base_model))
    out = workspace.layout.generation_gguf()
    return _current(out, _fingerprint(source), lambda: _write_base(workspace, base_model, source, out))


def generation_adapter(
    workspace: Workspace, base_model: LLMConfig, persona_id: str, folder: Path
) -> tuple[Path, bool]:
    """(GGUF file, is an adapter) for a trained folder under ``base_model.backend: llamacpp``: a LoRA
    adapter file of the base (F32, exact), or a merged model file for a persona that cannot be one."""
    if is_base_adapter(folder):
        out = workspace.layout.lora_gguf(persona_id, folder.name)
        config = _base_config(workspace, base_model)
        name = f"{persona_id} ({folder.name})"
        made = _current(out, _fingerprint(folder), lambda: write_lora_gguf(folder, config, out, name, "f32"))
        return made, True

    def merged() -> None:
        trained, tokenizer = load_folder(workspace, base_model, folder, persona_id, merge=True)
        write_gguf(trained, tokenizer, out, f"{workspace.persona(persona_id).name} ({folder.name})", "f16")

    out = folder / GENERATION_GGUF
    return _current(out, _fingerprint(folder), merged), False


# --------------------------------------------------------------------------- helpers


def _current(out: Path, source: str, make: Any) -> Path:
    """``out``, made again by ``make()`` unless its stamp says it came from ``source``."""
    stamp = out.with_name(out.name + ".json")
    if out.exists() and stamp.exists() and json.loads(stamp.read_text()).get("source") == source:
        return out
    make()
    stamp.write_text(json.dumps({"source": source}) + "\n", encoding="utf-8")
    return out


def _fingerprint(path: Path) -> str:
    return weights_fingerprint(path) if path.exists() else str(path)


def _base_config(workspace: Workspace, base_model: LLMConfig) -> Any:
    from transformers import AutoConfig

    name = common.base_model_name(workspace, base_model)
    if name.endswith(".gguf"):
        return AutoConfig.from_pretrained(str(Path(name).parent), gguf_file=Path(name).name)
    return AutoConfig.from_pretrained(name)


def _write_base(workspace: Workspace, base_model: LLMConfig, source: Path, out: Path) -> dict[str, Any]:
    model, tokenizer = common.load_pretrained(workspace, base_model, str(source))
    return write_gguf(model, tokenizer, out, base_model.model, "f16")


def _base_file(
    project: Project, out: Path, base_name: str, source: str, file_type: str, marker: dict[str, Any]
) -> dict[str, Any]:
    earlier = marker.get("base") or {}
    if (out / BASE_FILE).exists() and earlier.get("source") == source:
        return dict(earlier)
    model, tokenizer = common.load_pretrained(project.workspace, project.config.base_model, base_name)
    facts = write_gguf(model, tokenizer, out / BASE_FILE, project.config.base_model.model, file_type)
    return {**facts, "source": source}


def _modelfile(
    project: Project,
    persona_id: str,
    variant: str,
    folder: Path,
    out: Path,
    model_file: str,
    adapter_file: str | None,
    stage: str | None,
) -> dict[str, Any]:
    modelfile = out / f"{persona_id}.Modelfile"
    stage_id = _write_modelfile(
        project, persona_id, variant, folder, modelfile, model_file, adapter_file, stage
    )
    return {
        "persona": persona_id,
        "variant": variant,
        "form": "lora" if adapter_file else "merged",
        "stage": stage_id,
        "modelfile": str(modelfile),
    }


def _write_modelfile(
    project: Project,
    persona_id: str,
    variant: str,
    folder: Path,
    modelfile: Path,
    model_file: str,
    adapter_file: str | None,
    stage: str | None,
) -> str:
    from transformers import AutoTokenizer

    persona = project.persona(persona_id)
    stage_cfg = persona.stage(stage) if stage else persona.stages[-1]
    template = AutoTokenizer.from_pretrained(str(folder)).chat_template
    note = (
        f"persllm export: {persona.name} ({variant}) at stage {stage_cfg.id}. "
        f"Create it with: ollama create {persona.id}-{stage_cfg.id} -f {modelfile.name}"
    )
    text = modelfile_text(
        model_file,
        system_prompt(persona, stage_cfg, common.system_style(folder)),
        stage_cfg.label,
        isinstance(template, str) and "<|im_start|>" in template,
        note,
        adapter_file,
    )
    partial = modelfile.with_name(modelfile.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(modelfile)
    return stage_cfg.id


def _read_marker(out: Path) -> dict[str, Any]:
    path = out / MARKER
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _check_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(
            f"{out}: exists and is not an earlier persllm --gguf export; choose a new folder or empty it"
        )
    out.mkdir(parents=True, exist_ok=True)
