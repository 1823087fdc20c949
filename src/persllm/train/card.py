"""The model card (``README.md``) of a trained persona folder: base, method, data, stage labels and how to
prompt and load the adapter; the evaluation writes its headline into it later.

The card is built by pure functions from ``training.json``-style facts and the persona, so it is tested
without training anything.
"""

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persllm.bundled import SMOLLM2
from persllm.metric_catalog import HEADLINE, fmt_estimate

if TYPE_CHECKING:
    from persllm.config import PersonaConfig

TEMPLATES = Path(__file__).with_name("templates")
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
EVAL_BLOCK = re.compile(r"(<!-- persllm:eval -->\n)(.*?)(\n<!-- /persllm:eval -->)", re.DOTALL)
NOT_EVALUATED = "Not evaluated yet: `persllm eval CONFIG` writes its headline here."


def portable_base(model: str) -> str:
    """The base model's name as a user elsewhere can resolve it (the bundled GGUF's hub id)."""
    return SMOLLM2_HUB if model == SMOLLM2 else model


def model_card(persona: "PersonaConfig", info: dict[str, Any], system: dict[str, str]) -> str:
    """The card of one trained folder.

    Args:
        persona: whose model it is.
        info: the folder's ``training.json`` contents (method, lora config, rows, steps, labels, ...).
        system: stage id -> the exact system prompt the model was trained with.
    """
    lora = (info.get("config") or {}).get("lora") or {}
    variant = str(info.get("stage", "sft"))
    kind = str(info.get("label_kind", "text"))
    labels: dict[str, str] = info.get("stage_labels") or {s.id: str(s.label) for s in persona.stages}
    base = str(info.get("base_model_id") or info.get("base_model") or "")
    rank = int(lora.get("r", 16))
    fields = {
        "base": base,
        "name": persona.name,
        "persona": persona.id,
        "variant": variant,
        "lora_name": f"{persona.id}-{variant}",
        "method_tag": variant,
        "method": "supervised fine-tuning" if variant == "sft" else "DPO from the SFT adapter",
        "rank": rank,
        "alpha": lora.get("lora_alpha", "-"),
        "targets": _targets(lora.get("target_modules")),
        "data": _data(info),
        "steps": info.get("steps", "-"),
        "final_loss": _number(
            info.get("final_loss") if info.get("final_loss") is not None else info.get("train_loss")
        ),
        "label_kind": _kind_text(kind),
        "stages": _stage_table(persona, labels, system),
        "evaluation": NOT_EVALUATED,
        "example_system": _escape(system.get(persona.stages[-1].id, "")),
        "example_label": labels.get(persona.stages[-1].id, ""),
        "vllm_rank": next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank),
    }
    engine = "card_engines_merged.md" if kind == "new_tokens" else "card_engines_lora.md"
    fields["engines"] = (TEMPLATES / engine).read_text(encoding="utf-8").format(**fields)
    return (TEMPLATES / "model_card.md").read_text(encoding="utf-8").format(**fields)


def evaluation_lines(metrics: dict[str, Any], system: str, persona_id: str) -> list[str]:
    """The card's evaluation block for ``system`` (``sft`` or ``sft+dpo``) from ``eval/metrics.json``:
    its held-out metrics and its difference from the baseline, each with the 95% interval."""

    data = (metrics.get("systems") or {}).get(system) or {}
    baseline = (metrics.get("settings") or {}).get("baseline", "prompt")
    key = "heldout" if "heldout_ci" in data else "overall"
    values = data.get(f"{key}_ci") or {}
    difference = ((metrics.get("differences") or {}).get(key) or {}).get(system) or {}
    if not values:
        return []
    count = (metrics.get("counts") or {}).get("heldout_items" if key == "heldout" else "golden_items")
    where = "the person's held-out real words" if key == "heldout" else "held-out annotator dialogues"
    lines = [
        f"`persllm eval` as system `{system}` (this persona's adapter, `{persona_id}`, beside the project's "
        f"other personas), on {count} items of {where}, with 95% paired bootstrap intervals over items "
        f"(`*`: the interval of the difference excludes 0):",
        "",
        f"| metric | {system} | {system} - {baseline} |",
        "|---|---|---|",
    ]
    for metric in HEADLINE:
        if metric in values:
            change = difference.get(metric)
            mark = " *" if change and change.get("excludes_zero") else ""
            lines.append(
                f"| {metric} | {fmt_estimate(values[metric])} | {fmt_estimate(change, signed=True)}{mark} |"
            )
    return lines


def write_evaluation(folder: Path, lines: list[str]) -> None:
    """Put ``lines`` into the evaluation block of ``folder/README.md`` (when the folder has our card)."""
    path = folder / "README.md"
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if EVAL_BLOCK.search(text):
            path.write_text(with_evaluation(text, lines), encoding="utf-8")


def with_evaluation(card: str, lines: list[str]) -> str:
    """``card`` with its evaluation block replaced by ``lines`` (a card without the block is kept)."""
    text = "\n".join(lines) if lines else NOT_EVALUATED
    return EVAL_BLOCK.sub(lambda m: m.group(1) + text + m.group(3), card, count=1)


def _targets(targets: Any) -> str:
    if isinstance(targets, list | tuple):
        return ", ".join(f"`{t}`" for t in targets)
    return f"`{targets}`" if targets else "-"


def _data(info: dict[str, Any]) -> str:
    if info.get("stage") == "dpo":
        return f"{info.get('train_rows', 0)} preference pairs (chosen: this persona at this stage)"
    test = info.get("test_rows", 0)
    return f"{info.get('train_rows', 0)} training dialogues, {test} test dialogues"


def _kind_text(kind: str) -> str:
    return {
        "text": "plain text in the base vocabulary (a plain LoRA adapter; no tokens added)",
        "reserved": "reserved special tokens the base vocabulary already has (no tokens added)",
        "new_tokens": "new special tokens, trained with the embeddings (the adapter grows the vocabulary)",
    }.get(kind, kind)


def _stage_table(persona: "PersonaConfig", labels: dict[str, str], system: dict[str, str]) -> str:
    rows = ["| stage | label | system prompt |", "|---|---|---|"]
    for stage in persona.stages:
        prompt = system.get(stage.id, "").replace("\n", "<br>").replace("|", "\\|")
        rows.append(f"| {stage.id} | `{labels.get(stage.id, stage.label)}` | {prompt} |")
    return "\n".join(rows)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"
