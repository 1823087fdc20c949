"""Training commands: ``persllm train sft``, ``persllm train dpo`` and ``persllm export``.

The same ``train`` group runs as ``python -m persllm.train`` so ``accelerate launch -m persllm.train``
can start it on several GPUs; only the main process prints.
"""

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from persllm.cli.app import ConfigArg, SetOption, app, load
from persllm.errors import UserError

train_app = typer.Typer(
    name="train",
    help="Fine-tune the personas: SFT on the curated dialogues, then DPO on the preference pairs.\n\n"
    "Example: persllm train sft my-persona/persllm.yaml && persllm train dpo my-persona/persllm.yaml",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(train_app, name="train")

PersonaOption = Annotated[
    list[str] | None, typer.Option("--persona", "-p", help="Only this persona (repeatable); default: all.")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue from the last checkpoint in models/<persona>/checkpoints/.")
]


@train_app.command("sft")
def sft_command(
    config: ConfigArg,
    persona: PersonaOption = None,
    resume: ResumeOption = False,
    set_options: SetOption = None,
) -> None:
    """Supervised fine-tuning (LoRA by default) with the stage tokens; writes models/<persona>/sft.

    Settings: the sft: block of persllm.yaml (method, lora:, trl: passed to TRL's SFTConfig).

    Example: persllm train sft my-persona/persllm.yaml --persona wren --set sft.trl.max_steps=50
    """
    from persllm.train import sft

    _train(config, persona, resume, set_options, "sft", sft.run)


@train_app.command("dpo")
def dpo_command(
    config: ConfigArg,
    persona: PersonaOption = None,
    resume: ResumeOption = False,
    set_options: SetOption = None,
) -> None:
    """Preference optimisation from the SFT model (the frozen reference); writes models/<persona>/dpo.

    Settings: the dpo: block of persllm.yaml (method, lora:, trl: passed to TRL's DPOConfig).

    Example: persllm train dpo my-persona/persllm.yaml --persona wren --set dpo.trl.beta=0.2
    """
    from persllm.train import dpo

    _train(config, persona, resume, set_options, "dpo", dpo.run)


def _train(
    config: str, personas: list[str] | None, resume: bool, set_options: list[str] | None, stage: str, run: Any
) -> None:
    from persllm.train.common import validate_trl_blocks

    project = load(config, set_options)
    validate_trl_blocks(project)
    ids = personas or list(project.personas)
    for persona_id in ids:
        project.persona(persona_id)
    for persona_id in ids:
        info = run(project, persona_id, resume=resume)
        if _main_process():
            typer.echo(_describe(stage, info))


def _describe(stage: str, info: dict[str, Any]) -> str:
    def number(value: Any, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    parts = [
        f"{info['persona']}: {stage} {info['steps']} steps",
        f"final loss {number(info.get('final_loss'))}",
    ]
    if info.get("eval_loss") is not None:
        parts.append(f"eval loss {number(info['eval_loss'])}")
    if info.get("margins"):
        parts.append(f"reward margin {number(info['margins'][-1]['margin'])}")
    parts.append(f"{number(info.get('tokens_per_second'), 1)} tokens/s")
    return ", ".join(parts) + f" -> {info['output']}"


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@app.command("export")
def export_command(
    config: ConfigArg,
    persona: Annotated[str, typer.Option("--persona", "-p", help="The persona to export.")],
    merge: Annotated[
        Path | None,
        typer.Option("--merge", help="Output folder for the merged Hugging Face weights (new or empty)."),
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option(
            "--gguf", help="Output NAME.gguf for llama.cpp, with an Ollama NAME.Modelfile beside it."
        ),
    ] = None,
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="GGUF weight type: f16 or f32.")] = "f16",
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="Stage of the Modelfile's system prompt; default the latest."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="sft or dpo; default: dpo when trained, else sft.")
    ] = None,
    set_options: SetOption = None,
) -> None:
    """Merge a trained adapter into its base model and save it: Hugging Face weights or one GGUF file.

    --merge: a folder that loads with AutoModelForCausalLM.from_pretrained(OUT) alone. --gguf: a file
    that llama.cpp, Ollama and persllm's llamacpp backend load; both keep the stage tokens and the chat
    template.

    Example: persllm export my-persona/persllm.yaml --persona wren --model dpo --gguf wren-dpo.gguf
    """
    from persllm.train import export

    if (merge is None) == (gguf is None):
        raise UserError("persllm export: give exactly one of --merge FOLDER or --gguf NAME.gguf")
    project = load(config, set_options)
    if gguf is not None:
        info = export.run_gguf(project, persona, gguf, variant=model, file_type=gguf_type, stage=stage)
        tokens = ", ".join(f"{label}={token_id}" for label, token_id in info["stage_tokens"].items())
        size = info["bytes"] / 2**20
        typer.echo(
            f"{info['persona']}: {info['variant']} as GGUF {info['file_type']} ({size:.0f} MiB; {tokens})"
        )
        typer.echo(f"saved to {info['gguf']} and {info['modelfile']}")
        return
    assert merge is not None
    info = export.run(project, persona, merge, variant=model)
    tokens = ", ".join(f"{label}={token_id}" for label, token_id in info["stage_tokens"].items())
    typer.echo(f"{info['persona']}: {info['variant']} merged ({info['parameters']:,} parameters; {tokens})")
    typer.echo(f"saved to {info['output']}")
