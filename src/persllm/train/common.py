"""Small helpers shared by ``sft.run`` and ``dpo.run``: config blocks, data, tokens, models, outputs.

Heavy libraries (torch, transformers, trl, peft) are imported inside the functions so that importing
this module (e.g. for ``persllm --help``) stays fast.
"""

import contextlib
import difflib
import json
import os
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persllm.bundled import resolve_model
from persllm.config import LLMConfig, Project, Workspace
from persllm.config.stages import DPOSettings, SFTSettings
from persllm.config.train import (
    COMMON_TRL_DEFAULTS,
    DPO_TRL_DEFAULTS,
    LORA_DEFAULTS,
    SFT_TRL_DEFAULTS,
)
from persllm.errors import UserError
from persllm.jsonl import read_jsonl
from persllm.layout import RunLayout
from persllm.manifest import load_manifest, record_stage
from persllm.prompting import system_prompt
from persllm.train.card import model_card

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Trainer

    from persllm.prompting import SystemStyle

# transformers' models and tokenizers are typed too loosely for mypy to follow; they travel as Any.
Model = Any
Tokenizer = Any

TEMPLATES = Path(__file__).parent / "templates"
TRAINING_JSON = "training.json"
# Keys persllm decides itself; a value in the trl: block would be silently overwritten otherwise.
RESERVED_TRL_KEYS = ("output_dir", "resume_from_checkpoint")
STAGE_DEFAULTS = {"sft": SFT_TRL_DEFAULTS, "dpo": DPO_TRL_DEFAULTS}
TrainSettings = SFTSettings | DPOSettings


# --------------------------------------------------------------------------- config blocks


def device_defaults() -> dict[str, Any]:
    """Precision and memory settings by device: bf16 + checkpointing on CUDA, plain fp32 elsewhere."""
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "activation_checkpointing": True}
    plain = {"bf16": False, "fp16": False, "activation_checkpointing": False}
    if torch.backends.mps.is_available():
        return plain
    # use_cpu lets `accelerate launch --num_processes N` join N CPU processes over gloo (real DDP).
    return {**plain, "use_cpu": True}


def trl_kwargs(
    settings: TrainSettings, workspace: Workspace, output_dir: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """persllm defaults < device defaults < the ``trl:`` block < ``overrides``; output_dir is ours."""
    stage, block = settings.stage, settings.training
    user = {**block.trl, **overrides}
    # transformers 5 renamed gradient checkpointing; the old name in a trl: block still means what it says.
    if "gradient_checkpointing" in user:
        user.setdefault("activation_checkpointing", user.pop("gradient_checkpointing"))
    for key in RESERVED_TRL_KEYS:
        if key in user:
            raise UserError(
                f"{workspace.config_path}: {stage}.trl.{key}: set by persllm (checkpoints go to "
                f"models/<persona>/checkpoints/{stage}); remove it"
            )
    seeds = {"seed": settings.seed, "data_seed": settings.seed}
    ours: dict[str, Any] = {**COMMON_TRL_DEFAULTS, **STAGE_DEFAULTS[stage], **device_defaults(), **seeds}
    if isinstance(settings, SFTSettings):
        ours["assistant_only_loss"] = settings.sft.assistant_only_loss
    return {**ours, **user, "output_dir": str(output_dir)}


def build_trl_args(
    settings: TrainSettings, workspace: Workspace, output_dir: Path, overrides: dict[str, Any]
) -> Any:
    """The ``trl.SFTConfig`` / ``trl.DPOConfig`` of the stage; a bad key or value is a UserError."""
    import trl

    stage = settings.stage
    cls = trl.SFTConfig if stage == "sft" else trl.DPOConfig
    kwargs = trl_kwargs(settings, workspace, output_dir, overrides)
    _check_keys(workspace, f"{stage}.trl", kwargs, cls, f"TRL {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{workspace.config_path}: {stage}.trl: {problem}; fix the value") from None


def lora_kwargs(settings: TrainSettings) -> dict[str, Any]:
    return {**LORA_DEFAULTS, **settings.training.lora, "task_type": "CAUSAL_LM"}


def build_lora(
    settings: TrainSettings, workspace: Workspace, model: Model | None = None, new_tokens: bool = False
) -> Any:
    """``peft.LoraConfig`` from the ``lora:`` block; with new tokens, embeddings and LM head are trained too.

    ``trainable_token_indices`` would be lighter but breaks on tied embeddings, so the whole input and
    output embedding modules are saved instead; on a tied model they stay tied (one trained matrix).
    """
    from peft import LoraConfig

    kwargs = lora_kwargs(settings)
    _check_keys(workspace, f"{settings.stage}.lora", kwargs, LoraConfig, "peft LoraConfig")
    if new_tokens and model is not None:
        modules = list(kwargs.get("modules_to_save") or [])
        kwargs["modules_to_save"] = modules + [m for m in embedding_module_names(model) if m not in modules]
        if tied_embeddings(model):
            kwargs.setdefault("ensure_weight_tying", True)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{workspace.config_path}: {settings.stage}.lora: {exc}; fix the value") from None


def validate_trl_blocks(project: Project) -> None:
    """Build both TRL configs and both LoRA configs now, so a typo fails before a model is loaded."""
    scratch = project.layout.models / "_validate"
    for settings in (SFTSettings.of(project.config), DPOSettings.of(project.config)):
        build_trl_args(settings, project.workspace, scratch, {})
        build_lora(settings, project.workspace)


def _check_keys(workspace: Workspace, where: str, kwargs: dict[str, Any], cls: type, label: str) -> None:
    known = {f.name for f in fields(cls) if f.init}
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see the TRL/PEFT docs for the names"
            raise UserError(f"{workspace.config_path}: {where}.{key}: unknown {label} argument; {hint}")


# --------------------------------------------------------------------------- data


def read_dataset(path: Path, columns: list[str], make_it: str) -> "Dataset":
    """The ``columns`` of a JSONL file as a ``datasets.Dataset`` (``meta`` and the rest left out)."""
    from datasets import Dataset

    rows = read_jsonl(path)
    if not rows:
        state = "has no rows" if path.exists() else "not found"
        raise UserError(f"{path}: {state}; build it first ({make_it})")
    for number, row in enumerate(rows, start=1):
        for column in columns:
            if not isinstance(row.get(column), list) or not row[column]:
                raise UserError(
                    f"{path}:{number}: {column!r} must be a non-empty list of messages; fix that line"
                )
    return Dataset.from_list([{column: row[column] for column in columns} for row in rows])


# --------------------------------------------------------------------------- models and tokens


def has_rows(path: Path) -> bool:
    return path.exists() and path.read_text(encoding="utf-8").strip() != ""


def stage_labels(workspace: Workspace, persona_id: str) -> list[str]:
    return [str(stage.label) for stage in workspace.persona(persona_id).stages]


def base_model_name(workspace: Workspace, cfg: LLMConfig) -> str:
    """The weights training loads (``cfg``: base_model): with ``backend: llamacpp`` too, since llama.cpp
    only generates."""
    if cfg.backend == "openai":
        raise UserError(
            f"{workspace.config_path}: base_model.backend: training needs local weights; "
            "set backend: transformers (or llamacpp) and model: a folder, hub id or bundled:smollm2"
        )
    return resolve_model(cfg.model)


def load_pretrained(workspace: Workspace, base_model: LLMConfig, name: str) -> tuple[Model, Tokenizer]:
    """Model and tokenizer from a folder, hub id or ``.gguf`` file, in the dtype training wants.

    ``dtype: auto`` loads fp32 weights: bf16 autocast on CUDA gives the speed, and the embedding rows of
    new tokens keep full precision while they train.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name = base_model.dtype
    dtype = torch.float32 if dtype_name == "auto" else getattr(torch, dtype_name)
    path = Path(name)
    where: dict[str, Any] = {"pretrained_model_name_or_path": name}
    if path.suffix == ".gguf":
        where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
    except OSError as exc:
        raise UserError(
            f"{workspace.config_path}: base_model.model: cannot load {name!r} ({str(exc).splitlines()[0]}); "
            "use a local folder, a downloaded hub id or bundled:smollm2"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_stage_tokens(model: Model, tokenizer: Tokenizer, labels: list[str]) -> list[int]:
    """Add the stage labels as special tokens and give every new embedding row the mean of the old rows.

    Returns the ids of the tokens that were added (empty when the tokenizer already had them). Rows are
    also grown when the tokenizer already knows the labels but the model does not (a base model about
    to receive an adapter trained with them). Tied and untied output embeddings are both handled.
    """
    import torch

    known = len(tokenizer)
    missing = [label for label in labels if label not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    new_ids = [int(tokenizer.convert_tokens_to_ids(label)) for label in missing]
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    fresh = sorted(set(new_ids) | set(range(rows, len(tokenizer))))
    if fresh:
        with torch.no_grad():
            source = min(known, rows)
            embeddings = model.get_input_embeddings().weight
            embeddings[fresh] = embeddings[:source].mean(dim=0)
            output = model.get_output_embeddings()
            if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
                output.weight[fresh] = output.weight[:source].mean(dim=0)
    return new_ids


def single_token_ids(tokenizer: Tokenizer, labels: list[str]) -> dict[str, int]:
    """label -> token id for the labels that are one token of ``tokenizer`` (reserved or new tokens)."""
    vocab = tokenizer.get_vocab()
    return {label: int(vocab[label]) for label in labels if label in vocab}


def tied_embeddings(model: Model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def embedding_module_names(model: Model) -> list[str]:
    """The short names PEFT matches (``embed_tokens``, ``lm_head``) of the input and output embeddings."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = [
        name.rsplit(".", 1)[-1]
        for target in wanted
        for name, module in model.named_modules()
        if module is target
    ]
    return list(dict.fromkeys(names))


def training_chat_template(workspace: Workspace, tokenizer: Tokenizer) -> str | None:
    """A chat template with ``{% generation %}`` markers for the assistant-only loss, or None if the
    tokenizer's own template has them. It must render exactly what the serving template renders."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise UserError(
            f"{workspace.config_path}: base_model.model: the tokenizer has no chat template; "
            "use an instruct/chat model or set sft.assistant_only_loss: false"
        )
    if has_generation_markers(template):
        return None
    candidates = [(TEMPLATES / "chatml_generation.jinja").read_text(encoding="utf-8")]
    with contextlib.suppress(ValueError, TypeError):
        candidates.insert(0, str(get_training_chat_template(tokenizer)))
    for candidate in candidates:
        if _renders_like(tokenizer, template, candidate):
            return candidate
    raise UserError(
        f"{workspace.config_path}: base_model.model: its chat template has no {{% generation %}} markers and "
        "persllm has no training twin for it; set sft.trl.chat_template_path to a template with markers, "
        "or sft.assistant_only_loss: false"
    )


def _renders_like(tokenizer: Tokenizer, serving: str, candidate: str) -> bool:
    probe = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "<TIME-I> q"},
        {"role": "assistant", "content": "<think>\na\n</think>\nr"},
        {"role": "user", "content": "q2"},
    ]
    try:
        for prompt in (False, True):
            expect = tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=prompt, chat_template=serving
            )
            got = tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=prompt, chat_template=candidate
            )
            if expect != got:
                return False
    except Exception:  # a foreign template may need variables ours does not pass
        return False
    return True


# --------------------------------------------------------------------------- checkpoints and outputs


def model_dirs(layout: RunLayout, persona_id: str, stage: str) -> tuple[Path, Path]:
    """(final model folder, checkpoint folder) of one persona's ``stage`` ('sft' or 'dpo')."""
    return layout.model(persona_id, stage), layout.checkpoints(persona_id, stage)


def checkpoint_to_resume(checkpoints: Path, resume: bool) -> str | None:
    """The newest complete checkpoint when resuming (a torn one, cut short by a kill while saving, is
    skipped with a warning); a fresh run first clears the checkpoints of the run it replaces."""
    from accelerate import PartialState

    if resume:
        found = sorted(
            (path for path in checkpoints.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()),
            key=lambda path: int(path.name.split("-")[-1]),
            reverse=True,
        )
        for path in found:
            if complete_checkpoint(path):
                return str(path)
            print(f"warning: {path} is incomplete (stopped while saving?); resuming from an earlier one")
        return None
    state = PartialState()
    if state.is_main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)
    state.wait_for_everyone()
    return None


def complete_checkpoint(path: Path) -> bool:
    """A checkpoint the trainer can resume from: its state, its weights and its optimizer all written."""
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "trainer_state.json").is_file() and weights and (path / "optimizer.pt").is_file()


def drop_checkpoints(settings: TrainSettings, checkpoints: Path) -> None:
    """Once the final model is written its checkpoints are dead weight, unless `<stage>.keep_checkpoints`."""
    if not settings.training.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)


def summarise(trainer: "Trainer", output: Any, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The contents of ``training.json``: steps, losses, time, throughput, config."""
    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h]
    metrics = dict(output.metrics)
    seconds = float(metrics.get("train_runtime", time.time() - started))
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    return {
        "steps": trainer.state.global_step,
        "global_step": trainer.state.global_step,
        "final_loss": losses[-1]["loss"] if losses else None,
        "train_loss": metrics.get("train_loss"),
        "losses": losses,
        "train_seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_second": metrics.get("train_tokens_per_second")
        or (round(tokens / seconds, 2) if seconds else None),
        **extra,
    }


def save_final(
    trainer: "Trainer", tokenizer: Tokenizer, out_dir: Path, info: dict[str, Any], card: str = ""
) -> None:
    """Write adapter (or weights), tokenizer, model card and training.json to a side folder, then swap it in.

    Readers of ``models/<persona>/<stage>`` never see a half-written model; the swap happens on the
    main process after every rank has written its part. The adapter's ``base_model_name_or_path`` is
    ``info["base_model_id"]`` (a name a user can resolve, not this machine's cache path).
    """
    partial = out_dir.with_name(out_dir.name + ".partial")
    main = trainer.is_world_process_zero()
    if main and partial.exists():
        shutil.rmtree(partial)
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config") and not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        # PEFT would also store full copies of the resized embeddings next to the modules_to_save ones.
        if main:
            model.save_pretrained(str(partial), save_embedding_layers=False)
    else:
        trainer.save_model(str(partial))
    if main:
        tokenizer.save_pretrained(str(partial))
        if is_adapter(partial) and info.get("base_model_id"):
            set_adapter_base(partial, str(info["base_model_id"]))
        if card:
            (partial / "README.md").write_text(card, encoding="utf-8")
        text = json.dumps(info, indent=2, ensure_ascii=False, default=str) + "\n"
        (partial / TRAINING_JSON).write_text(text, encoding="utf-8")
        old = out_dir.with_name(out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def card_text(workspace: Workspace, persona_id: str, info: dict[str, Any]) -> str:
    """The model card of a trained folder described by ``info`` (its training.json contents)."""

    persona = workspace.persona(persona_id)
    style: SystemStyle = "brief" if info.get("system_prompt") == "brief" else "full"
    system = {stage.id: system_prompt(persona, stage, style) for stage in persona.stages}
    return model_card(persona, info, system)


def set_adapter_base(folder: Path, base: str) -> None:
    """Point ``adapter_config.json``'s ``base_model_name_or_path`` at ``base``."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def record(workspace: Workspace, stage: str, persona_id: str, info: dict[str, Any]) -> None:
    """Add this persona's outcome to the manifest entry of ``stage`` (train_sft / train_dpo)."""
    entry = load_manifest(workspace.run_dir)["stages"].get(stage, {})
    personas = dict(entry.get("personas", {}))
    keep = (
        "steps",
        "final_loss",
        "train_loss",
        "eval_loss",
        "train_seconds",
        "tokens_per_second",
        "output",
        "heldout_pairs",
    )
    personas[persona_id] = {key: info.get(key) for key in keep}
    record_stage(workspace, stage, status="done", personas=personas)


def read_training_json(folder: Path) -> dict[str, Any]:
    path = folder / TRAINING_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def system_style(folder: Path) -> "SystemStyle":
    """How a trained model must be prompted: the style it was trained with (``full`` for older models)."""
    return "brief" if read_training_json(folder).get("system_prompt") == "brief" else "full"


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").exists()


def is_model_folder(folder: Path) -> bool:
    return is_adapter(folder) or (folder / "config.json").exists()
