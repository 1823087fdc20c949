"""Training commands: ``persllm train sft``, ``persllm train dpo`` and ``persllm export``.

The same ``train`` group runs as ``python -m persllm.train`` so ``accelerate launch -m persllm.train``
can start it on several GPUs; only the main process prints.
"""

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from persllm import __version__
from persllm.cli.app import ConfigArg, SetOption, WaitOption, app, load, writing
from persllm.config.stages import DPOSettings, SFTSettings
from persllm.errors import UserError
from persllm.jsonl import read_jsonl
from persllm.layout import write_atomic
from persllm.persona.character_card import card_problems, persona_card, png_with_card
from persllm.prompting import system_prompt
from persllm.train import common, dpo, export, gguf_files, sft
from persllm.train.card import portable_base
from persllm.train.common import validate_trl_blocks
from persllm.train.vllm_check import max_lora_rank, vllm_problems

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
    wait: WaitOption = False,
    set_options: SetOption = None,
) -> None:
    """Supervised fine-tuning (LoRA by default) with the stage tokens; writes models/<persona>/sft.

    Settings: the sft: block of persllm.yaml (method, lora:, trl: passed to TRL's SFTConfig).

    Example: persllm train sft my-persona/persllm.yaml --persona wren --set sft.trl.max_steps=50
    """

    _train(config, persona, resume, set_options, "sft", sft.run, wait)


@train_app.command("dpo")
def dpo_command(
    config: ConfigArg,
    persona: PersonaOption = None,
    resume: ResumeOption = False,
    wait: WaitOption = False,
    set_options: SetOption = None,
) -> None:
    """Preference optimisation from the SFT model (the frozen reference); writes models/<persona>/dpo.

    Settings: the dpo: block of persllm.yaml (method, lora:, trl: passed to TRL's DPOConfig).

    Example: persllm train dpo my-persona/persllm.yaml --persona wren --set dpo.trl.beta=0.2
    """

    _train(config, persona, resume, set_options, "dpo", dpo.run, wait)


def _train(
    config: str,
    personas: list[str] | None,
    resume: bool,
    set_options: list[str] | None,
    stage: str,
    run: Any,
    wait: bool = False,
) -> None:
    from contextlib import nullcontext

    project = load(config, set_options)
    validate_trl_blocks(project)
    ids = personas or list(project.personas)
    for persona_id in ids:
        project.persona(persona_id)
    # Under `accelerate launch` every rank runs this; the main one holds the run folder for all of them.
    settings = (SFTSettings if stage == "sft" else DPOSettings).of(project.config)
    with writing(project, f"train {stage}", wait) if _main_process() else nullcontext():
        for persona_id in ids:
            info = run(settings, project.workspace, persona_id, resume=resume)
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
    persona: Annotated[
        list[str] | None,
        typer.Option("--persona", "-p", help="The persona to export (repeatable; --gguf DIR: default all)."),
    ] = None,
    merge: Annotated[
        Path | None,
        typer.Option("--merge", help="Output folder for the merged Hugging Face weights (new or empty)."),
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option(
            "--gguf",
            help="Output for llama.cpp and Ollama: a folder DIR (the base once, each persona as a LoRA "
            "adapter, a Modelfile each) or NAME.gguf (one persona merged into one file).",
        ),
    ] = None,
    gguf_type: Annotated[
        str, typer.Option("--gguf-type", help="GGUF weight type: f16, f32 or q8_0.")
    ] = "f16",
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="Stage of the Modelfile's system prompt; default the latest."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="sft or dpo; default: dpo when trained, else sft.")
    ] = None,
    vllm: Annotated[
        bool,
        typer.Option(
            "--vllm",
            help="Check every persona's adapter against vLLM's LoRA loader and print the serve command.",
        ),
    ] = False,
    card: Annotated[
        Path | None,
        typer.Option(
            "--card",
            help="Write a Character Card V3 of one persona at --stage (default the latest): FILE.json, or "
            "FILE.png with the card inside (SillyTavern imports either). Needs the index, not a model.",
        ),
    ] = None,
    set_options: SetOption = None,
) -> None:
    """Export trained personas: merged Hugging Face weights, or GGUF files for llama.cpp and Ollama.

    --merge FOLDER: one persona merged into weights that load with AutoModelForCausalLM.from_pretrained
    alone. --gguf DIR: DIR/base.gguf once, and per persona DIR/<persona>-<variant>.lora.gguf (a llama.cpp
    LoRA adapter; a persona trained with new stage tokens is merged into its own file instead) and an
    Ollama DIR/<persona>.Modelfile (FROM the base, ADAPTER the persona). --gguf NAME.gguf: one persona
    merged into one file, with NAME.Modelfile. --vllm: nothing is written; each adapter is checked
    against vLLM's LoRA rules and the `vllm serve --enable-lora` command for all of them is printed.
    --card FILE: a Character Card V3 (JSON, or PNG with the card inside) of one persona at one stage, its
    stages in extensions.persllm and a lorebook of the index's knowledge passages.

    Example: persllm export my-persona/persllm.yaml --gguf gguf/ --gguf-type q8_0
    """

    if [merge is not None, gguf is not None, vllm, card is not None].count(True) != 1:
        raise UserError(
            "persllm export: give exactly one of --merge FOLDER, --gguf DIR (or NAME.gguf), --vllm, "
            "--card FILE"
        )
    project = load(config, set_options)
    if card is not None:
        typer.echo(_write_card(project, persona, stage, card))
        return
    if vllm:
        typer.echo(_vllm_command(project, persona, model))
        return
    if gguf is not None and gguf.suffix != ".gguf":
        info = gguf_files.export_dir(project, gguf, persona, variant=model, file_type=gguf_type, stage=stage)
        if info["base"] is not None:
            typer.echo(f"base: {info['base']['gguf']} ({info['base']['bytes'] / 2**20:.1f} MiB)")
        for item in info["personas"]:
            typer.echo(
                f"{item['persona']}: {item['variant']} as {item['form']} GGUF {item['file_type']} "
                f"({item['bytes'] / 2**20:.1f} MiB) -> {item['gguf']}, {item['modelfile']}"
            )
        return
    if not persona or len(persona) != 1:
        raise UserError("persllm export: --merge and --gguf NAME.gguf take exactly one --persona")
    if gguf is not None:
        info = gguf_files.export_merged(
            project, persona[0], gguf, variant=model, file_type=gguf_type, stage=stage
        )
        size = info["bytes"] / 2**20
        typer.echo(
            f"{info['persona']}: {info['variant']} as GGUF {info['file_type']} ({size:.0f} MiB"
            f"{_tokens(info['stage_tokens'])})"
        )
        typer.echo(f"saved to {info['gguf']} and {info['modelfile']}")
        return
    assert merge is not None
    info = export.run(project, persona[0], merge, variant=model)
    typer.echo(
        f"{info['persona']}: {info['variant']} merged ({info['parameters']:,} parameters"
        f"{_tokens(info['stage_tokens'])})"
    )
    typer.echo(f"saved to {info['output']}")


def _vllm_command(project: Any, personas: list[str] | None, variant: str | None) -> str:
    """The ``vllm serve`` command for the personas' adapters; a UserError naming what vLLM would refuse."""

    modules, rank = [], 8
    for persona_id in personas or list(project.personas):
        chosen = variant or export.pick_variant(project.workspace, project.persona(persona_id).id)
        folder, _ = common.model_dirs(project.layout, persona_id, chosen)
        problems = vllm_problems(folder) if common.is_adapter(folder) else ["not a LoRA adapter folder"]
        if problems:
            raise UserError(
                f"{folder}: vLLM would refuse this adapter ({problems[0]}); train with stage_labels.kind: "
                "text (the default), or serve merged weights: persllm export --merge"
            )
        modules.append(f"{persona_id}-{chosen}={folder}")
        rank = max(rank, max_lora_rank(folder))
    base = portable_base(project.config.base_model.model)
    return f"vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules {' '.join(modules)}"


def _write_card(project: Any, personas: list[str] | None, stage: str | None, out: Path) -> str:
    """Write a V3 card of one persona; the line that says what was written."""
    import json

    if out.suffix.lower() not in (".json", ".png"):
        raise UserError(f"--card {out}: name the card FILE.json or FILE.png")
    if len(personas or project.personas) != 1:
        raise UserError("persllm export --card: name one persona with --persona")
    persona = project.persona(personas[0] if personas else next(iter(project.personas)))
    chosen = persona.stage(stage) if stage else persona.stages[-1]
    layout = project.layout
    knowledge: list[tuple[str, str, str]] = []
    own: list[str] = []  # the chosen stage's own words: the card's greeting is one of them
    for each in persona.stages:
        path = layout.chunks(persona.id, each.id)
        if not path.exists():
            raise UserError(f"{path}: no index for {persona.id}/{each.id}; run `persllm index` first")
        chunks = read_jsonl(path)
        knowledge += [(each.id, c["ref"], c["text"]) for c in chunks if c["kind"] == "knowledge"]
        if each.id == chosen.id:
            own = [c["text"] for c in chunks if c["kind"] == "style"]
    exchanges = [row["turns"] for row in read_jsonl(layout.exchanges(persona.id, chosen.id))[:3]]
    data = persona.model_dump(mode="json", exclude_none=True)
    data["stages"] = [
        {"id": s.id, "time": s.time, **({"label": s.label} if s._label_given else {})} for s in persona.stages
    ]
    made = persona_card(
        data,
        chosen.id,
        system_prompt(persona, chosen, "full"),
        knowledge,
        exchanges,
        min(own, key=lambda text: abs(len(text.split()) - 40), default=""),
        __version__,
    )
    problems = card_problems(made)
    assert not problems, problems  # persona_card writes every required field
    body = (
        png_with_card(made)
        if out.suffix.lower() == ".png"
        else json.dumps(made, indent=2, ensure_ascii=False).encode()
    )
    write_atomic(out, body)
    entries = len(made["data"]["character_book"]["entries"])
    return f"{persona.id} at stage {chosen.id}: Character Card V3 with {entries} lorebook entries -> {out}"


def _tokens(stage_tokens: dict[str, int]) -> str:
    """``; <TIME-I>=401, ...`` for labels that are single tokens; nothing for text labels."""
    if not stage_tokens:
        return ""
    return "; " + ", ".join(f"{label}={token_id}" for label, token_id in stage_tokens.items())
