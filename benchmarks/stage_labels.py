"""One base, many personas: do text stage labels condition a LoRA as well as new tokens, and how small are
the adapters and the llama.cpp files?

Compares two trained runs of the demo with the same data that differ only in ``stage_labels.kind``:
``examples/demo/runs/demo`` (``make demo``: text labels, the default) and
``examples/demo/runs/demo-new-tokens`` (the same index, annotations and data copied in, then trained and
evaluated with ``--set stage_labels.kind=new_tokens``). A missing run is made first (about 20 minutes each
on 2 cores).

    .venv/bin/python benchmarks/stage_labels.py

For each run: stage identifiability of the held-out generations (from its ``eval/metrics.json``), and the
likelihood of each held-out passage as the reply to its question under the right stage label against the
other stage's label (same system prompt; then label and time phrase both switched): the share where the
right label makes the person's real words more likely (chance 1/S) and the mean margin in nats/token,
with 95% bootstrap intervals over passages. Then the sizes: each adapter, and ``persllm export --gguf``
of the text run (one base file and an adapter per persona, f16 and q8_0) against merged files per persona.
Prints a table and writes benchmarks/out/stage_labels.json.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
CONFIG = REPO / "examples" / "demo" / "persllm.yaml"
RUNS = CONFIG.parent / "runs"
RESAMPLES = 2000
COPIED = ("index", "annotations", "data", "cache.sqlite")


def bootstrap(values: list[float], seed: int = 7) -> dict[str, float]:
    """Mean and 95% percentile bootstrap interval over items."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(RESAMPLES, len(data)))].mean(axis=1)
    return {
        "value": round(float(data.mean()), 4),
        "low": round(float(np.percentile(means, 2.5)), 4),
        "high": round(float(np.percentile(means, 97.5)), 4),
        "n": len(data),
    }


def nll_table(run_dir: Path, kind: str) -> dict[str, Any]:
    """Mean NLL per token of each held-out passage under every stage's label (and label + time)."""
    from persllm.config import load_project
    from persllm.jsonl import read_jsonl
    from persllm.llm import LLMConfig, TransformersBackend
    from persllm.prompting import system_prompt
    from persllm.train.common import read_training_json, system_style

    project = load_project(CONFIG, {"run_dir": str(run_dir.resolve()), "stage_labels.kind": kind})
    backend = TransformersBackend(
        LLMConfig(model=project.config.base_model.model, device="cpu", concurrency=8)
    )
    label_only, label_and_time = [], []
    for persona_id, persona in project.personas.items():
        folder = project.layout.model(persona_id, "dpo")
        backend.add_adapter(persona_id, folder)
        style = system_style(folder)
        labels = read_training_json(folder).get("stage_labels") or {s.id: s.label for s in persona.stages}
        for record in read_jsonl(project.layout.heldout_questions(persona_id)):
            question, passage = record["turns"][0]["content"], record["turns"][1]["content"]
            own = record["stage"]
            conversations, stages = [], []
            for stage in persona.stages:
                for switch_time in (False, True):
                    prompt_stage = stage if switch_time else persona.stage(own)
                    conversations.append(
                        [
                            {"role": "system", "content": system_prompt(persona, prompt_stage, style)},
                            {"role": "user", "content": f"{labels[stage.id]} {question}"},
                        ]
                    )
                    stages.append((stage.id, switch_time))
            scored = backend.reply_logprobs(
                conversations, [passage] * len(conversations), {"adapter": persona_id}
            )
            nll = {key: -float(np.mean(row)) for key, row in zip(stages, scored, strict=True)}
            for switch_time, sink in ((False, label_only), (True, label_and_time)):
                right = nll[(own, switch_time)]
                wrong = [v for (sid, t), v in nll.items() if t == switch_time and sid != own]
                sink.append(
                    {"right": right, "wrong": float(np.mean(wrong)), "wins": all(right < w for w in wrong)}
                )
    return {"label_only": label_only, "label_and_time": label_and_time, "stages": len(persona.stages)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "right_label_wins": bootstrap([float(r["wins"]) for r in rows]),
        "margin_nats_per_token": bootstrap([r["wrong"] - r["right"] for r in rows]),
        "nll_right": bootstrap([r["right"] for r in rows]),
    }


def eval_numbers(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    system = metrics["systems"]["sft+dpo"]["heldout_ci"]
    difference = metrics["differences"]["heldout"]["sft+dpo"]
    keep = ("stage_acc", "persona_acc", "style_fidelity", "rouge_l")
    return {
        "sft+dpo": {k: system[k] for k in keep},
        "sft+dpo - prompt": {k: difference[k] for k in keep},
        "items": metrics["counts"]["heldout_items"],
    }


def sizes(text_run: Path, new_run: Path) -> dict[str, Any]:
    """Adapter folder sizes, and the llama.cpp files of both runs."""
    from persllm.config import load_project
    from persllm.train.gguf_files import export_dir

    adapters = {}
    for label, run in (("text", text_run), ("new_tokens", new_run)):
        for weights in sorted(run.glob("models/*/*/adapter_model.safetensors")):
            adapters[f"{label}:{weights.parent.parent.name}/{weights.parent.name}"] = weights.stat().st_size
    exports: dict[str, Any] = {}
    for label, run, kind in (("text", text_run, "text"), ("new_tokens", new_run, "new_tokens")):
        project = load_project(CONFIG, {"run_dir": str(run.resolve()), "stage_labels.kind": kind})
        for file_type in ("f16", "q8_0") if kind == "text" else ("f16",):
            started = time.perf_counter()
            info = export_dir(project, OUT / f"gguf-{label}-{file_type}", file_type=file_type)
            exports[f"{label}:{file_type}"] = {
                "base_bytes": (info["base"] or {}).get("bytes", 0),
                "persona_files": {p["gguf"].rsplit("/", 1)[-1]: p["bytes"] for p in info["personas"]},
                "seconds": round(time.perf_counter() - started, 1),
            }
    return {"adapter_weights_bytes": adapters, "gguf": exports}


def ensure_runs(text_run: Path, new_run: Path) -> None:
    """Make the two demo runs that are missing: text labels first, then new tokens on a copy of its data."""
    persllm = str(Path(sys.executable).parent / "persllm")
    if not (text_run / "eval" / "metrics.json").exists():
        subprocess.run([persllm, "run", str(CONFIG), "--set", f"run_dir={text_run}"], check=True)
    if not (new_run / "eval" / "metrics.json").exists():
        new_run.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            source, target = text_run / name, new_run / name
            if source.is_dir() and not target.exists():
                shutil.copytree(source, target)
            elif source.is_file() and not target.exists():
                shutil.copy2(source, target)
        new_tokens = ["--set", "stage_labels.kind=new_tokens", "--set", f"run_dir={new_run}"]
        subprocess.run([persllm, "run", str(CONFIG), *new_tokens], check=True)


def tabulated(result: dict[str, Any], rows: list[tuple[str, Any]]) -> dict[str, Any]:
    """The JSON written: a row per label kind and per file (what results.md shows), then every detail."""
    comparison = []
    for kind, run in result["runs"].items():
        row: dict[str, Any] = {"labels": kind, "items": run["eval"]["items"], "chance": run["chance"]}
        for name, pick in rows:
            estimate = pick(run)
            row[name] = f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"
        comparison.append(row)
    adapters = [
        {"adapter": name, "MB": round(size / 1e6, 1)}
        for name, size in result["sizes"]["adapter_weights_bytes"].items()
    ]
    gguf = [
        {
            "export": name,
            "base MB": round(info["base_bytes"] / 1e6, 1),
            **{f"{f} MB": round(b / 1e6, 1) for f, b in info["persona_files"].items()},
            "seconds": info["seconds"],
        }
        for name, info in result["sizes"]["gguf"].items()
    ]
    return {"comparison": comparison, "adapters": adapters, "gguf": gguf, "detail": result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=RUNS / "demo")
    parser.add_argument("--new", type=Path, default=RUNS / "demo-new-tokens")
    args = parser.parse_args()
    args.text, args.new = args.text.resolve(), args.new.resolve()
    ensure_runs(args.text, args.new)
    result: dict[str, Any] = {"runs": {}}
    for kind, run in (("text", args.text), ("new_tokens", args.new)):
        table = nll_table(run, kind)
        result["runs"][kind] = {
            "run_dir": str(run),
            "eval": eval_numbers(run),
            "likelihood_label_only": summary(table["label_only"]),
            "likelihood_label_and_time": summary(table["label_and_time"]),
            "chance": round(1 / table["stages"], 3),
        }
    result["sizes"] = sizes(args.text, args.new)

    def cell(estimate: dict[str, Any]) -> str:
        return f"{estimate['value']:+.3f} [{estimate['low']:+.3f}, {estimate['high']:+.3f}]"

    print(f"{'measure':52} {'text labels':28} {'new tokens':28}")
    rows = [
        ("stage_acc of sft+dpo generations", lambda r: r["eval"]["sft+dpo"]["stage_acc"]),
        ("stage_acc, sft+dpo - prompt", lambda r: r["eval"]["sft+dpo - prompt"]["stage_acc"]),
        ("persona_acc, sft+dpo - prompt", lambda r: r["eval"]["sft+dpo - prompt"]["persona_acc"]),
        (
            "right label more likely (share; label only)",
            lambda r: r["likelihood_label_only"]["right_label_wins"],
        ),
        ("margin nats/token (label only)", lambda r: r["likelihood_label_only"]["margin_nats_per_token"]),
        (
            "right stage more likely (label + time)",
            lambda r: r["likelihood_label_and_time"]["right_label_wins"],
        ),
        (
            "margin nats/token (label + time)",
            lambda r: r["likelihood_label_and_time"]["margin_nats_per_token"],
        ),
        ("NLL of the real words, right label", lambda r: r["likelihood_label_only"]["nll_right"]),
    ]
    for name, pick in rows:
        text, new = (cell(pick(result["runs"][k])) for k in ("text", "new_tokens"))
        print(f"{name:52} {text:28} {new:28}")
    for name, size in result["sizes"]["adapter_weights_bytes"].items():
        print(f"adapter {name:44} {size / 1e6:8.1f} MB")
    for name, info in result["sizes"]["gguf"].items():
        files = ", ".join(f"{f} {b / 1e6:.1f} MB" for f, b in info["persona_files"].items())
        print(f"gguf {name:12} base {info['base_bytes'] / 1e6:7.1f} MB; {files}")
    OUT.mkdir(exist_ok=True)
    (OUT / "stage_labels.json").write_text(json.dumps(tabulated(result, rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
