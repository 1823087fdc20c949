"""Personification quality on real people: Lincoln and Roosevelt, two stages each, bundled SmolLM2.

Builds a persllm project in ``benchmarks/out/personification/`` whose personas read the speeches in
``../shared/corpora`` in place (never copied), runs the whole pipeline (``persllm run``: held-out split,
own-words dialogues, SFT, DPO, evaluation) with SmolLM2-135M-Instruct as annotator and base model on the
CPU, and reports every system (``prompt``, ``rag``, ``sft``, ``sft+dpo``) against the persons' held-out
real words, with paired bootstrap 95% intervals, plus the paper's distinction table (Intra / Stage /
Inter, with and without DPO) and whether each target was met.

    .venv/bin/python benchmarks/personification.py [--size small|full|power] [--fresh]

``small`` (what ``make bench`` runs, about 60 minutes here with the robustness probes): 8 held-out
passages and 16 own-words dialogues per stage. ``full`` (at most 2 hours on 2 cores): 15 held-out
passages and 40 dialogues per stage, two samples per item. ``power`` (the size the fidelity targets
need): 100 held-out passages per stage (400, from 105 held out) scored by likelihood against decoys and
under each stage, 30 per stage (120) also answered, 180 own-words dialogues planned per stage (145 to 163
reached training after curation); 95 min from an empty folder (benchmarks/results.md). Progress lines
pass through to stderr. Every model call is cached in the run folder, so a re-run only pays for what
changed; ``--fresh`` starts from an empty run folder. Prints a table and writes
benchmarks/out/personification.json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
PROJECT = OUT / "personification"
CORPORA = (REPO.parent / "shared" / "corpora").resolve()
SYSTEMS = ["prompt", "rag", "sft", "sft+dpo"]
TARGET_METRICS = ["style_fidelity", "persona_acc", "stage_acc", "rouge_l"]
PERSONAS = {
    "lincoln": {
        "name": "Abraham Lincoln",
        "profile": "A self-taught Illinois lawyer and politician: plain-spoken, fond of stories and close "
        "logic, morally opposed to the spread of slavery, devoted above all to the Union.",
        "stages": [
            ("1852-1860", "It is 1858, in Springfield, Illinois, during the Senate race against Douglas."),
            ("1861-1865", "It is 1863, in the White House, in the middle of the Civil War."),
        ],
    },
    "roosevelt": {
        "name": "Franklin D. Roosevelt",
        "profile": "The thirty-second President: warm, confident and conversational, a reformer who speaks "
        "to ordinary families about work, security and the duties of government.",
        "stages": [
            ("1933-1941", "It is 1936, in the White House, during the New Deal."),
            ("1941-1945", "It is 1943, in the White House, with the nation at war."),
        ],
    },
}
SMALL = {"heldout": 8, "spare": 0, "own_words": 16, "samples": 1, "epochs": 3, "dpo_steps": 3}
SIZES: dict[str, dict[str, Any]] = {
    "small": {**SMALL, "generated": None, "conversation_turns": 4},
    "full": {
        **SMALL,
        "heldout": 15,
        "own_words": 40,
        "samples": 2,
        "dpo_steps": 8,
        "generated": None,
        "conversation_turns": 4,
    },
    # The size the fidelity targets need: 400 held-out passages scored by likelihood, 120 of them answered.
    # 5 spare passages per stage stand in for those whose question the annotator fails to back-write;
    # 12 DPO steps already learn (30 reached the same held-out accuracy) and keep the run in 2 hours.
    "power": {
        "heldout": 100,
        "spare": 5,
        "own_words": 180,
        "samples": 1,
        "epochs": 2,
        "dpo_steps": 12,
        "generated": 30,
        "conversation_turns": 2,
    },
}
LIKELIHOOD_TARGETS = {"heldout_nll": -1, "pick_real": 1, "stage_wins": 1}  # metric -> better direction


def write_project(size: dict[str, Any]) -> Path:
    """The project files: one persona file per person, the speeches as both style and knowledge."""
    (PROJECT / "personas").mkdir(parents=True, exist_ok=True)
    for persona_id, spec in PERSONAS.items():
        stages = [
            {
                "id": stage,
                "time": time_phrase,
                "style": [str(CORPORA / persona_id / stage / "*.txt")],
                "knowledge": [str(CORPORA / persona_id / stage / "*.txt")],
            }
            for stage, time_phrase in spec["stages"]
        ]
        persona = {"id": persona_id, "name": spec["name"], "profile": spec["profile"], "stages": stages}
        (PROJECT / "personas" / f"{persona_id}.yaml").write_text(yaml.safe_dump(persona, sort_keys=False))
    config = {
        "project": "personification",
        "personas": ["personas/*.yaml"],
        "seed": 11,
        "holdout": {
            "share": 0.01,
            "min_passages": size["heldout"] + size["spare"],
            "max_passages": size["heldout"] + size["spare"],
        },
        "corpus": {"max_words": 90},
        "retrieval": {"knowledge_words": 160, "style_words": 80},
        "annotator": {
            "backend": "llamacpp",
            "model": "bundled:smollm2",
            "concurrency": 16,
            "params": {"temperature": 0.7},
        },
        "annotate": {
            "counts": {
                "ordinary": size["own_words"] - size["own_words"] // 4,
                "misleading": 0,
                "opinion": size["own_words"] // 4,
            },
            "own_words_share": {"ordinary": 1.0, "opinion": 1.0},
            "own_words_max_words": 60,
            "own_words_analysis": False,
            "multi_turn_share": 0,
            "max_attempts": 5,
        },
        "curate": {"cot": "none", "system_prompt": "brief", "question_similarity_min": 0.1},
        "pairs": {"similarity_min": 0.2},
        "base_model": {"model": "bundled:smollm2", "concurrency": 16},
        "sft": {
            "trl": {
                "num_train_epochs": size["epochs"],
                "learning_rate": 1.0e-3,
                "per_device_train_batch_size": 8,
                "max_length": 320,
            }
        },
        "dpo": {
            "trl": {
                "max_steps": size["dpo_steps"],
                "learning_rate": 1.0e-4,
                "per_device_train_batch_size": 8,
                "beta": 0.1,
                "max_length": 320,
            }
        },
        "eval": {
            "systems": SYSTEMS,
            "samples": size["samples"],
            # Greedy with one sample; the Intra distinction needs two sampled answers per item.
            "params": {"temperature": 0.7 if size["samples"] > 1 else 0, "max_tokens": 48},
            "robustness": {
                "probes_per_stage": 3,
                "pressure_turns": 3,
                "conversation_turns": size["conversation_turns"],
            },
            "heldout_items": size["generated"],
            "likelihood": {"max_tokens": 64, "max_items": size["heldout"]},
            "dtype": "bfloat16",  # about 1.8x faster on this CPU (AVX-512 BF16)
        },
    }
    path = PROJECT / "persllm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_pipeline(config: Path) -> tuple[float, str]:
    persllm = Path(sys.executable).with_name("persllm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    # Progress lines (stderr) pass through: a power run takes two hours.
    done = subprocess.run([str(persllm), "run", str(config)], env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"persllm run failed with exit {done.returncode}")
    return seconds, done.stdout


def summarise(metrics: dict[str, Any]) -> dict[str, Any]:
    """Rows of systems x metrics with intervals, the differences, the distinction table and the targets."""
    systems = metrics["systems"]
    rows = []
    for name in [*SYSTEMS, "reference"]:
        data = metrics["reference"] if name == "reference" else systems.get(name, {})
        ci = data.get("heldout_ci", {})
        rows.append({"system": name, **{m: interval_text(ci.get(m)) for m in [*TARGET_METRICS, "bleu"]}})
    differences = metrics.get("differences", {}).get("heldout", {})
    difference_rows = [
        {
            "difference": f"{name} - prompt",
            **{m: interval_text(differences.get(name, {}).get(m), True) for m in TARGET_METRICS},
        }
        for name in SYSTEMS[1:]
        if name in differences
    ]
    distinction = [
        {
            "system": name,
            **{
                m: interval_text(systems.get(name, {}).get("heldout_ci", {}).get(m))
                for m in ("intra_bleu", "stage_bleu", "inter_bleu")
            },
        }
        for name in ("sft", "sft+dpo")
    ]
    likelihood = metrics.get("likelihood") or {}
    likelihood_rows = [
        {"system": name, **{m: interval_text(data.get(m)) for m in LIKELIHOOD_TARGETS}}
        for name, data in (likelihood.get("systems") or {}).items()
    ]
    for key, other in (("differences", "prompt"), ("differences_rag", "rag")):
        likelihood_rows += [
            {
                "system": f"{name} - {other}",
                **{m: interval_text(found.get(m), True) for m in LIKELIHOOD_TARGETS},
            }
            for name, found in (likelihood.get(key) or {}).items()
        ]
    return {
        "likelihood": likelihood_rows,
        "systems": rows,
        "differences": difference_rows,
        "distinction": distinction,
        "robustness": robustness_rows(metrics.get("robustness") or {}),
        "targets": targets(metrics),
    }


def robustness_rows(robustness: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per system (and per difference to prompt) over the robustness metrics, with intervals."""
    from persllm.evaluate.robustness import METRICS

    rows = [
        {"system": name, **{m: interval_text(data["metrics"].get(m)) for m in METRICS}}
        for name, data in (robustness.get("systems") or {}).items()
    ]
    rows += [
        {"system": f"{name} - prompt", **{m: interval_text(found.get(m), True) for m in METRICS}}
        for name, found in (robustness.get("differences") or {}).items()
    ]
    return rows


def targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the benchmark: met or missed, with the numbers it was judged on."""
    systems = metrics["systems"]
    differences = metrics.get("differences", {}).get("heldout", {})
    found: list[dict[str, Any]] = []
    for trained in ("sft", "sft+dpo"):
        for metric in TARGET_METRICS:
            over_prompt = differences.get(trained, {}).get(metric, {})
            rag = systems.get("rag", {}).get("heldout_ci", {}).get(metric, {})
            mine = systems.get(trained, {}).get("heldout_ci", {}).get(metric, {})
            beats_rag = (mine.get("low") or float("-inf")) > (rag.get("high") or float("inf"))
            found.append(
                {
                    "target": f"{trained} > prompt and rag on {metric}",
                    "vs_prompt": interval_text(over_prompt, True),
                    "prompt_excluded": bool(over_prompt.get("excludes_zero"))
                    and (over_prompt.get("value") or 0) > 0,
                    "rag_intervals_apart": beats_rag,
                }
            )
    likelihood = metrics.get("likelihood") or {}
    for trained in ("sft", "sft+dpo"):
        for metric, direction in LIKELIHOOD_TARGETS.items():
            versus = {
                other: (likelihood.get(key) or {}).get(trained, {}).get(metric, {})
                for key, other in (("differences", "prompt"), ("differences_rag", "rag"))
            }
            found.append(
                {
                    "target": f"{trained} beats prompt and rag on {metric} (likelihood)",
                    "vs_prompt": interval_text(versus["prompt"], True),
                    "vs_rag": interval_text(versus["rag"], True),
                    "met": all(
                        bool(d.get("excludes_zero")) and (d.get("value") or 0) * direction > 0
                        for d in versus.values()
                    ),
                }
            )
    sft = systems.get("sft", {}).get("heldout", {})
    dpo = systems.get("sft+dpo", {}).get("heldout", {})
    for metric, direction in (("intra_bleu", 1), ("inter_bleu", -1)):
        if sft.get(metric) is not None and dpo.get(metric) is not None:
            met = (dpo[metric] - sft[metric]) * direction > 0
            found.append({"target": f"DPO {'raises' if direction > 0 else 'lowers'} {metric}", "met": met})
    return found


def interval_text(estimate: dict[str, Any] | None, signed: bool = False) -> str:
    if not estimate or estimate.get("value") is None:
        return "-"
    spec = "+.3f" if signed else ".3f"
    text = format(estimate["value"], spec)
    if estimate.get("low") is not None:
        text += f" [{format(estimate['low'], spec)}, {format(estimate['high'], spec)}]"
    return text


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--fresh", action="store_true", help="Delete the run folder first.")
    args = parser.parse_args()
    if not CORPORA.is_dir():
        print(
            f"error: {CORPORA}: the shared corpora are not there; this benchmark needs them", file=sys.stderr
        )
        return 2
    if args.fresh:
        shutil.rmtree(PROJECT / "runs", ignore_errors=True)
    config = write_project(SIZES[args.size])
    seconds, _ = run_pipeline(config)
    run_folder = PROJECT / "runs" / "personification"
    metrics = json.loads((run_folder / "eval" / "metrics.json").read_text())
    manifest = json.loads((run_folder / "manifest.json").read_text())
    summary = summarise(metrics)
    result = {
        "size": args.size,
        "settings": SIZES[args.size],
        "corpora": str(CORPORA),
        "seconds": round(seconds, 1),
        "stage_seconds": {name: entry.get("seconds") for name, entry in manifest["stages"].items()},
        "eval_seconds": metrics.get("seconds"),
        "items": metrics["counts"].get("heldout_items"),
        "likelihood_items": (metrics.get("likelihood") or {}).get("counts", {}).get("items"),
        **summary,
    }
    print_table(
        "likelihood of the real held-out words (95% paired bootstrap intervals)", summary["likelihood"]
    )
    print_table("held-out real words (95% paired bootstrap intervals)", summary["systems"])
    print_table("differences to prompt", summary["differences"])
    print_table("distinction (held-out items)", summary["distinction"])
    print_table("robustness (95% bootstrap intervals over probes; paired differences)", summary["robustness"])
    print_table("targets", summary["targets"])
    print_table("seconds per stage", [result["stage_seconds"]])
    print(f"\n{result['items']} held-out items, {seconds / 60:.1f} min")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "personification.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
