"""Direct preference optimisation of one persona's SFT model on ``data/<persona>/dpo_train.jsonl``.

The policy starts from ``models/<persona>/sft`` and the SFT model is the frozen reference. With a LoRA
SFT adapter and ``dpo.method: lora`` (the default) the adapter itself keeps training and TRL keeps a
frozen copy of it as the reference (``DPOTrainer`` adds a ``ref`` adapter when given a PEFT model and no
``ref_model``), so the result is again one adapter on the base model. After full SFT, ``lora`` puts a
new adapter on the SFT weights (reference: the adapter switched off); ``full`` trains every weight
against a second, frozen copy of the SFT model.
"""

import time
from pathlib import Path
from typing import Any

from persllm import stats
from persllm.config import Workspace
from persllm.config.stages import DPOSettings
from persllm.errors import UserError
from persllm.layout import write_atomic, write_json_atomic
from persllm.llm import TransformersBackend
from persllm.train import common
from persllm.train.card import portable_base


def run(
    settings: DPOSettings, workspace: Workspace, persona_id: str, resume: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Train the DPO model of ``persona_id`` from its SFT model.

    Args:
        settings: the sections DPO reads (``DPOSettings.of(project.config)``).
        workspace: the project's personas and run folder (``project.workspace``).
        persona_id: which persona.
        resume: continue from the last checkpoint in ``models/<persona>/checkpoints/dpo``.
        **overrides: ``trl.DPOConfig`` arguments that win over the ``dpo.trl`` block (e.g. max_steps=5).

    Returns:
        The contents of ``training.json``: steps, final_loss, losses, margins, output, ...
    """
    import trl

    cfg = settings.dpo
    persona = workspace.persona(persona_id)
    sft_dir, _ = common.model_dirs(workspace.layout, persona.id, "sft")
    out_dir, checkpoints = common.model_dirs(workspace.layout, persona.id, "dpo")

    # Config first: a typo in dpo.trl or dpo.lora fails before anything is loaded.
    args = common.build_trl_args(settings, workspace, checkpoints, overrides)
    common.build_lora(settings, workspace)

    # Inputs: the SFT model and the preference pairs (TRL's conversational prompt/chosen/rejected).
    if not common.is_model_folder(sft_dir):
        raise UserError(
            f"{sft_dir}: no SFT model; train it first: "
            f"persllm train sft {workspace.config_path} --persona {persona.id}"
        )
    pair_columns = ["prompt", "chosen", "rejected"]
    dpo_train = workspace.layout.dpo_train(persona.id)
    every_pair = common.read_dataset(dpo_train, pair_columns, "persllm pairs CONFIG")
    train_set, heldout_set = split_pairs(every_pair, cfg.heldout_share, settings.seed)

    # Policy and reference, both from the SFT model; the tokenizer (stage tokens, template) comes with it.
    sft_info = common.read_training_json(sft_dir)
    trained_on, base_now = sft_info.get("base_model"), common.base_model_name(workspace, settings.base_model)
    if common.is_adapter(sft_dir) and trained_on and trained_on != base_now:
        raise UserError(
            f"{workspace.config_path}: base_model.model: the SFT adapter in {sft_dir} was trained on "
            f"{trained_on}, not {base_now}; retrain SFT (persllm train sft) or restore base_model.model"
        )
    model, ref_model, peft_config, tokenizer, adapter_base = load_policy(
        settings, workspace, sft_dir, cfg.method
    )

    # Train, continuing from the last checkpoint when asked.
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    checkpoint = common.checkpoint_to_resume(checkpoints, resume)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=checkpoint)

    # The frozen "ref" copy of the adapter is TRL's bookkeeping, not part of the result.
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(trained, "peft_config", {}):
        trained.delete_adapter("ref")

    # Save adapter/weights + tokenizer + training.json, then record in the manifest.
    history = trainer.state.log_history
    info = common.summarise(
        trainer,
        output,
        started,
        {
            "persona": persona.id,
            "stage": "dpo",
            "margins": [
                {"step": h["step"], "margin": h["rewards/margins"]} for h in history if "rewards/margins" in h
            ],
            "accuracies": [
                {"step": h["step"], "accuracy": h["rewards/accuracies"]}
                for h in history
                if "rewards/accuracies" in h
            ],
            "resumed_from": checkpoint,
            "output": str(out_dir),
            "method": cfg.method,
            "base_model": trained_on or base_now,
            "base_model_id": sft_info.get("base_model_id") or portable_base(settings.base_model.model),
            "adapter_base": adapter_base,
            "reference": str(sft_dir),
            "label_kind": sft_info.get("label_kind", "new_tokens"),
            "stage_labels": sft_info.get("stage_labels") or {s.id: s.label for s in persona.stages},
            "stage_tokens": sft_info.get("stage_tokens", {}),
            "system_prompt": common.system_style(sft_dir),
            "train_rows": len(train_set),
            "heldout_rows": len(heldout_set),
            "config": {
                "trl": common.trl_kwargs(settings, workspace, checkpoints, overrides),
                # The adapter's own LoRA settings: a new one's, or those of the SFT adapter it continues.
                "lora": common.lora_kwargs(settings)
                if peft_config is not None
                else (sft_info.get("config") or {}).get("lora"),
            },
        },
    )
    common.save_final(trainer, tokenizer, out_dir, info, common.card_text(workspace, persona.id, info))
    if trainer.is_world_process_zero():
        # Measured on the written adapter, against the SFT adapter it started from, then added to the record.
        if len(heldout_set) and adapter_base == "base_model":
            info["heldout_pairs"] = heldout_rewards(settings, out_dir, sft_dir, heldout_set, float(args.beta))
        else:
            why = "dpo.heldout_share is 0" if not len(heldout_set) else "measured for LoRA-on-LoRA DPO only"
            info["heldout_pairs"] = {"pairs": len(heldout_set), "skipped": why}
        write_json_atomic(out_dir / common.TRAINING_JSON, info)
        write_atomic(out_dir / "README.md", common.card_text(workspace, persona.id, info))
        common.record(workspace, "train_dpo", persona.id, info)
        common.drop_checkpoints(settings, checkpoints)
    return info


def split_pairs(pairs: Any, share: float, seed: int) -> tuple[Any, Any]:
    """(training pairs, held-out pairs): a seeded ``share`` held out, at least one when there are 4+."""
    import numpy as np

    count = len(pairs)
    held = min(count - 1, max(1 if count >= 4 else 0, round(share * count))) if share > 0 else 0
    order = np.random.default_rng(seed).permutation(count)
    return pairs.select(sorted(order[held:].tolist())), pairs.select(sorted(order[:held].tolist()))


def heldout_rewards(
    settings: DPOSettings, policy: Path, reference: Path, pairs: Any, beta: float
) -> dict[str, Any]:
    """DPO's implicit reward on pairs it never trained on: per pair, ``beta`` x the policy's log-ratio to
    the reference on the chosen reply minus on the rejected one; accuracy = share of margins above 0,
    both with 95% bootstrap intervals over pairs."""
    import numpy as np

    backend = TransformersBackend(settings.base_model.model_copy(update={"backend": "transformers"}))
    backend.add_adapter("policy", policy)
    backend.add_adapter("reference", reference)
    prompts = [row["prompt"] for row in pairs]
    replies = {side: [row[side][-1]["content"] for row in pairs] for side in ("chosen", "rejected")}
    total: dict[tuple[str, str], np.ndarray] = {}
    for adapter in ("policy", "reference"):
        for side, texts in replies.items():
            rows = backend.reply_logprobs(prompts, texts, {"adapter": adapter})
            total[(adapter, side)] = np.asarray([sum(row) for row in rows])
    backend.release()
    chosen = total[("policy", "chosen")] - total[("reference", "chosen")]
    rejected = total[("policy", "rejected")] - total[("reference", "rejected")]
    margins = beta * (chosen - rejected)
    indices = stats.resample_indices(len(margins), stats.RESAMPLES, settings.seed)
    accuracy = stats.mean_estimate((margins > 0).astype(float).tolist(), indices)
    return {
        "pairs": len(margins),
        "accuracy": {
            **accuracy.to_dict(),
            "above_chance": bool(accuracy.low is not None and accuracy.low > 0.5),
        },
        "margin": stats.mean_estimate(margins.tolist(), indices).to_dict(),
        "chosen_log_ratio": stats.mean_estimate((beta * chosen).tolist(), indices).to_dict(),
    }


def load_policy(
    settings: DPOSettings, workspace: Workspace, sft_dir: Path, method: str
) -> tuple[Any, Any, Any, Any, str | None]:
    """(policy, ref_model, peft_config, tokenizer, adapter_base) for the SFT x DPO method pairs.

    ``adapter_base`` says what the saved DPO adapter sits on: 'base_model', 'sft' (full SFT weights),
    or None when DPO trains every weight.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(sft_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if method == "lora" and common.is_adapter(sft_dir):
        from peft import PeftModel

        # TRL copies this adapter into a frozen "ref" adapter: the reference is exactly the SFT model.
        policy = PeftModel.from_pretrained(
            _base_with_tokens(settings, workspace, tokenizer), str(sft_dir), is_trainable=True
        )
        return policy, None, None, tokenizer, "base_model"
    if method == "lora":
        # A fresh adapter on the full SFT weights; with the adapter switched off TRL gets the reference.
        return (
            _sft_weights(settings, workspace, sft_dir, tokenizer),
            None,
            common.build_lora(settings, workspace),
            tokenizer,
            "sft",
        )
    # Full DPO: every weight trains against a frozen second copy of the SFT model.
    policy = _sft_weights(settings, workspace, sft_dir, tokenizer).requires_grad_(True)
    reference = _sft_weights(settings, workspace, sft_dir, tokenizer).eval()
    return policy, reference, None, tokenizer, None


def _sft_weights(settings: DPOSettings, workspace: Workspace, sft_dir: Path, tokenizer: Any) -> Any:
    """The SFT model as plain weights: its adapter merged into the base, or the full SFT folder."""
    if common.is_adapter(sft_dir):
        from peft import PeftModel

        return PeftModel.from_pretrained(
            _base_with_tokens(settings, workspace, tokenizer), str(sft_dir)
        ).merge_and_unload()
    model, _ = common.load_pretrained(workspace, settings.base_model, str(sft_dir))
    return model


def _base_with_tokens(settings: DPOSettings, workspace: Workspace, tokenizer: Any) -> Any:
    """The base model grown to the SFT tokenizer's vocabulary, ready for the SFT adapter."""
    base = settings.base_model
    model, _ = common.load_pretrained(workspace, base, common.base_model_name(workspace, base))
    common.add_stage_tokens(model, tokenizer, [])
    return model
