"""Settings of SFT and DPO training: our few knobs plus TRL's and PEFT's own blocks passed through.

The ``trl:`` and ``lora:`` blocks are merged *over* persllm's defaults (below), so a project that
writes ``sft: {trl: {max_steps: 50}}`` keeps the default learning rate instead of falling back to
TRL's. ``persllm.train.common.validate_trl_blocks`` builds the real TRL and PEFT objects from them so
a misspelt key fails before any model is loaded.
"""

from typing import Any, Literal

from pydantic import Field

from persllm.schema import Section

LORA_DEFAULTS: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "all-linear",
}
SFT_TRL_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 2,
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 4,
    "max_length": 1024,
}
DPO_TRL_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "learning_rate": 5e-5,
    "beta": 0.1,
    "per_device_train_batch_size": 4,
    "max_length": 1024,
}
# Checkpointing and logging defaults shared by both trainers (TRL/transformers would save every 500 steps
# without a limit, and report to every installed tracker).
COMMON_TRL_DEFAULTS: dict[str, Any] = {
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "logging_steps": 10,
    "report_to": "none",
    "include_num_input_tokens_seen": "non_padding",
}


class SFTConfig(Section):
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapter or full fine-tuning.")
    lora: dict[str, Any] = Field(
        default_factory=lambda: dict(LORA_DEFAULTS),
        description="peft.LoraConfig arguments, merged over r=16, lora_alpha=32, lora_dropout=0.05, "
        "target_modules=all-linear.",
    )
    trl: dict[str, Any] = Field(
        default_factory=lambda: dict(SFT_TRL_DEFAULTS),
        description="trl.SFTConfig arguments, merged over persllm's defaults (max_length, learning_rate, "
        "max_steps, save_steps, packing, ...).",
    )
    assistant_only_loss: bool = Field(True, description="Train only on the assistant turns.")
    keep_checkpoints: bool = Field(
        False, description="Keep models/<persona>/checkpoints/sft after the final model is written."
    )


class DPOConfig(Section):
    method: Literal["lora", "full"] = Field(
        "lora",
        description="LoRA or full fine-tuning; after LoRA SFT, 'lora' continues training the SFT adapter.",
    )
    lora: dict[str, Any] = Field(
        default_factory=lambda: dict(LORA_DEFAULTS),
        description="peft.LoraConfig arguments for a new adapter (used when SFT was full fine-tuning).",
    )
    trl: dict[str, Any] = Field(
        default_factory=lambda: dict(DPO_TRL_DEFAULTS),
        description="trl.DPOConfig arguments, merged over persllm's defaults (beta, learning_rate, "
        "max_steps, ...).",
    )
    keep_checkpoints: bool = Field(
        False, description="Keep models/<persona>/checkpoints/dpo after the final model is written."
    )
    heldout_share: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="Seeded share of the pairs kept out of training; their reward accuracy and margin "
        "(with 95% intervals) say whether DPO learnt. 0 = train on all.",
    )
