"""Supervised fine-tuning of one persona on ``data/<persona>/sft_train.jsonl`` with TRL's SFTTrainer.

The stage labels (``<TIME-I>``, ...) are plain text or reserved tokens the base vocabulary already has
(``stage_labels.kind``), so the result is a plain LoRA adapter. Only ``new_tokens`` adds them as special
tokens whose embedding rows start at the mean of the existing rows and are trained (the embedding and LM
head are then saved with the adapter). Loss is on the assistant turns only. The result is
``models/<persona>/sft``: the adapter (or full weights), the tokenizer and the serving chat template, a
model card (``README.md``) and ``training.json``.
"""

import time
from typing import Any

from persllm.config import Workspace
from persllm.config.stages import SFTSettings
from persllm.curate.stats import curated_format
from persllm.train import common
from persllm.train.card import portable_base


def run(
    settings: SFTSettings, workspace: Workspace, persona_id: str, resume: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Train the SFT model of ``persona_id``.

    Args:
        settings: the sections SFT reads (``SFTSettings.of(project.config)``).
        workspace: the project's personas and run folder (``project.workspace``).
        persona_id: which persona.
        resume: continue from the last checkpoint in ``models/<persona>/checkpoints/sft`` (a fresh
            run otherwise, which clears those checkpoints).
        **overrides: ``trl.SFTConfig`` arguments that win over the ``sft.trl`` block (e.g. max_steps=5).

    Returns:
        The contents of ``training.json``: steps, final_loss, train_loss, eval_loss, losses, output, ...
    """
    import trl

    cfg = settings.sft
    persona = workspace.persona(persona_id)
    out_dir, checkpoints = common.model_dirs(workspace.layout, persona.id, "sft")

    # Config first: a typo in sft.trl or sft.lora fails before anything is loaded.
    args = common.build_trl_args(settings, workspace, checkpoints, overrides)
    common.build_lora(settings, workspace)

    # Data: TRL's conversational form; meta stays out of the trainer.
    make_it = "persllm curate CONFIG"
    train_set = common.read_dataset(workspace.layout.sft_train(persona.id), ["messages"], make_it)
    test_path = workspace.layout.sft_test(persona.id)
    test_set = common.read_dataset(test_path, ["messages"], make_it) if common.has_rows(test_path) else None

    # Model and tokenizer; with stage_labels.kind: new_tokens, the labels become new (mean-initialised) rows.
    base_name = common.base_model_name(workspace, settings.base_model)
    model, tokenizer = common.load_pretrained(workspace, settings.base_model, base_name)
    kind = settings.stage_labels.kind
    labels = common.stage_labels(workspace, persona.id)
    new_ids = common.add_stage_tokens(model, tokenizer, labels) if kind == "new_tokens" else []

    # Assistant-only loss needs {% generation %} markers; train with a twin template, serve with the original.
    serving_template = tokenizer.chat_template
    if args.assistant_only_loss and not args.chat_template_path:
        tokenizer.chat_template = common.training_chat_template(workspace, tokenizer) or serving_template

    # LoRA (embeddings + LM head trained when tokens were added) or full fine-tuning.
    peft_config = (
        common.build_lora(settings, workspace, model, new_tokens=bool(new_ids))
        if cfg.method == "lora"
        else None
    )

    # Train, continuing from the last checkpoint when asked.
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=test_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    checkpoint = common.checkpoint_to_resume(checkpoints, resume)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if test_set is not None else {}

    # Save adapter/weights + tokenizer (serving template) + training.json, then record in the manifest.
    if not args.chat_template_path:
        tokenizer.chat_template = serving_template
    info = common.summarise(
        trainer,
        output,
        started,
        {
            "persona": persona.id,
            "stage": "sft",
            "eval_loss": eval_metrics.get("eval_loss"),
            "resumed_from": checkpoint,
            "output": str(out_dir),
            "method": cfg.method,
            "base_model": base_name,
            "base_model_id": portable_base(settings.base_model.model),
            "adapter_base": "base_model",
            "label_kind": kind,
            "stage_labels": {stage.id: stage.label for stage in persona.stages},
            "stage_tokens": common.single_token_ids(tokenizer, labels),
            "added_token_ids": new_ids,
            "system_prompt": curated_format(workspace.layout.stats(persona.id), settings.curate)[1],
            "train_rows": len(train_set),
            "test_rows": len(test_set) if test_set is not None else 0,
            "config": {
                "trl": common.trl_kwargs(settings, workspace, checkpoints, overrides),
                "lora": common.lora_kwargs(settings) if cfg.method == "lora" else None,
                "assistant_only_loss": args.assistant_only_loss,
            },
        },
    )
    common.save_final(trainer, tokenizer, out_dir, info, common.card_text(workspace, persona.id, info))
    if trainer.is_world_process_zero():
        common.record(workspace, "train_sft", persona.id, info)
        common.drop_checkpoints(settings, checkpoints)
    return info
