"""``persllm run``: every stage in order, skipping those whose inputs and resolved config are unchanged.

A stage's fingerprint is a hash of the config sections it reads and of the files the stages before it
wrote. The manifest keeps, under ``pipeline``, the fingerprint of each stage's last run and its status; a
stage whose fingerprint matches and whose status is ``done`` is skipped. A stage that was interrupted (status
``running`` with the same fingerprint) is resumed: annotation skips the records it already has,
training continues from its last checkpoint. A stage whose fingerprint changed starts clean, with its
old outputs moved aside (never deleted), and everything after it re-runs only if its outputs change.
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.config import Project
from persllm.errors import UserError
from persllm.hashing import file_hash, stable_hash
from persllm.manifest import load_manifest, record_stage, write_manifest

STAGE_NAMES = ["index", "annotate", "curate", "pairs", "sft", "dpo", "eval"]


@dataclass
class StageResult:
    name: str
    status: str  # "ran", "resumed", "skipped"
    seconds: float
    counts: dict[str, Any]


@dataclass
class Stage:
    name: str
    config_keys: list[str]  # ProjectConfig sections this stage reads
    upstream: list[str]  # run-folder globs whose contents this stage reads
    outputs: list[str]  # run-folder globs this stage writes (moved aside when its inputs change)
    run: Callable[[Project, bool], dict[str, Any]]


# --------------------------------------------------------------------------- stage runners


def _run_index(project: Project, resume: bool) -> dict[str, Any]:
    from persllm import index

    return index.run(project)


def _run_annotate(project: Project, resume: bool) -> dict[str, Any]:
    from persllm import annotate

    return annotate.run(project)


def _run_curate(project: Project, resume: bool) -> dict[str, Any]:
    from persllm import curate

    return curate.run(project)


def _run_pairs(project: Project, resume: bool) -> dict[str, Any]:
    from persllm import pairs

    return pairs.run(project)


def _run_sft(project: Project, resume: bool) -> dict[str, Any]:
    from persllm.train import sft

    return training_counts({pid: sft.run(project, pid, resume=resume) for pid in project.personas})


def _run_dpo(project: Project, resume: bool) -> dict[str, Any]:
    from persllm.train import dpo

    return training_counts({pid: dpo.run(project, pid, resume=resume) for pid in project.personas})


def _run_eval(project: Project, resume: bool) -> dict[str, Any]:
    from persllm import evaluate

    result = evaluate.run(project)
    # The metrics themselves live in eval/metrics.json; the manifest keeps what the summary shows.
    return {**result["counts"], "systems": len(result["systems"])}


def training_counts(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over personas first (what the summary line shows), then each persona's own numbers."""
    keep = (
        "steps",
        "global_step",
        "final_loss",
        "train_loss",
        "eval_loss",
        "train_seconds",
        "tokens_per_second",
    )
    per_persona = {pid: {k: v for k, v in result.items() if k in keep} for pid, result in results.items()}

    def mean(key: str) -> float | None:
        values = [r[key] for r in per_persona.values() if isinstance(r.get(key), int | float)]
        return round(sum(values) / len(values), 4) if values else None

    totals = {
        "models": len(results),
        "steps": sum(int(r.get("steps") or 0) for r in per_persona.values()),
        "train_loss": mean("train_loss"),
        "tokens_per_second": mean("tokens_per_second"),
    }
    return {**{k: v for k, v in totals.items() if v is not None}, "personas": per_persona}


# What training reads of base_model: switching the generation backend does not retrain.
TRAINED_BASE = ["base_model.model", "base_model.device", "base_model.dtype"]

STAGES = [
    Stage(
        "index",
        ["embedder", "corpus", "holdout", "seed"],
        [],
        ["index/*/*/chunks.jsonl", "index/*/*/heldout.jsonl"],
        _run_index,
    ),
    Stage(
        "annotate",
        ["annotator", "annotate", "retrieval", "seed"],
        ["index/*/*/chunks.jsonl", "index/*/*/heldout.jsonl"],
        ["annotations"],
        _run_annotate,
    ),
    Stage(
        "curate", ["curate", "embedder", "seed"], ["annotations/*.jsonl"], ["data/*/sft_*.jsonl"], _run_curate
    ),
    Stage(
        "pairs",
        ["pairs", "annotator", "retrieval", "embedder", "base_model", "seed"],
        ["data/*/sft_*.jsonl", "annotations/*.jsonl"],
        ["data/*/dpo_train.jsonl"],
        _run_pairs,
    ),
    Stage(
        "sft",
        ["sft", "stage_labels", *TRAINED_BASE, "seed"],
        ["data/*/sft_*.jsonl"],
        ["models/*/sft", "models/*/checkpoints/sft"],
        _run_sft,
    ),
    Stage(
        "dpo",
        ["dpo", "stage_labels", *TRAINED_BASE, "seed"],
        ["data/*/dpo_train.jsonl", "models/*/sft/*.safetensors"],
        ["models/*/dpo", "models/*/checkpoints/dpo"],
        _run_dpo,
    ),
    Stage(
        "eval",
        ["eval", "base_model", "retrieval", "embedder", "seed"],
        [
            "data/*/sft_test.jsonl",
            "annotations/heldout/*.jsonl",
            "index/*/*/heldout.jsonl",
            "models/*/*/*.safetensors",
        ],
        ["eval"],
        _run_eval,
    ),
]


# --------------------------------------------------------------------------- fingerprints


def config_value(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, where a dotted key reaches into a section."""
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def fingerprint(project: Project, stage: Stage) -> str:
    """Hash of what the stage reads: its config sections, the personas, and upstream files."""
    config = project.config.model_dump(mode="json")
    files = {
        str(path.relative_to(project.run_dir)): file_hash(path)
        for pattern in stage.upstream
        for path in sorted(project.run_dir.glob(pattern))
        if path.is_file()
    }
    persona_inputs: dict[str, Any] = {}
    general = project.config.curate.general_data
    if stage.name == "curate" and general:
        general_path = project.root / general
        persona_inputs["general_data"] = file_hash(general_path) if general_path.exists() else None
    if stage.name == "index":
        for pid in project.personas:
            for st in project.personas[pid].stages:
                for kind in ("knowledge", "style"):
                    for path in project.stage_files(pid, st.id, kind):
                        persona_inputs[f"{pid}/{st.id}/{kind}/{path.name}"] = file_hash(path)
    return stable_hash(
        {
            "stage": stage.name,
            "config": {key: config_value(config, key) for key in stage.config_keys},
            "personas": {pid: p.model_dump(mode="json") for pid, p in project.personas.items()},
            "upstream": files,
            "corpus": persona_inputs,
        }
    )


def move_aside(project: Project, stage: Stage, old_hash: str) -> None:
    """Keep a stage's stale outputs under ``<run_dir>/stale/<stage>-<hash>/`` instead of deleting them."""
    target = project.run_dir / "stale" / f"{stage.name}-{old_hash}"
    for pattern in stage.outputs:
        for path in sorted(project.run_dir.glob(pattern)):
            destination = target / path.relative_to(project.run_dir)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(destination))


# --------------------------------------------------------------------------- run


def select(start: str | None, stop: str | None) -> list[Stage]:
    for name in (start, stop):
        if name is not None and name not in STAGE_NAMES:
            raise UserError(f"unknown stage {name!r}; use one of: {', '.join(STAGE_NAMES)}")
    first = STAGE_NAMES.index(start) if start else 0
    last = STAGE_NAMES.index(stop) if stop else len(STAGE_NAMES) - 1
    if first > last:
        raise UserError(f"--from {start} comes after --to {stop}; swap them")
    return STAGES[first : last + 1]


def run(
    project: Project,
    start: str | None = None,
    stop: str | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> list[StageResult]:
    """Run the stages from ``start`` to ``stop`` (inclusive); ``start`` forces that stage to re-run."""
    write_manifest(project)
    results: list[StageResult] = []
    for stage in select(start, stop):
        recorded = load_manifest(project.run_dir)["pipeline"].get(stage.name, {})
        current = fingerprint(project, stage)
        forced = stage.name == start
        if not forced and recorded.get("fingerprint") == current and recorded.get("status") == "done":
            results.append(StageResult(stage.name, "skipped", 0.0, recorded.get("counts", {})))
            if on_stage:
                on_stage(stage.name, "skipped")
            continue
        resume = not forced and recorded.get("fingerprint") == current and recorded.get("status") != "done"
        if not resume and recorded.get("fingerprint"):
            move_aside(project, stage, recorded["fingerprint"])
        if on_stage:
            on_stage(stage.name, "resuming" if resume else "running")
        record_stage(project, stage.name, section="pipeline", fingerprint=current, status="running")
        began = time.perf_counter()
        counts = stage.run(project, resume)
        seconds = round(time.perf_counter() - began, 2)
        record_stage(
            project,
            stage.name,
            section="pipeline",
            fingerprint=current,
            status="done",
            seconds=seconds,
            counts=_jsonable(counts),
        )
        results.append(StageResult(stage.name, "resumed" if resume else "ran", seconds, counts))
    return results


def _jsonable(counts: Any) -> Any:
    if isinstance(counts, dict):
        return {str(k): _jsonable(v) for k, v in counts.items()}
    if isinstance(counts, list | tuple):
        return [_jsonable(v) for v in counts]
    if isinstance(counts, str | int | float | bool) or counts is None:
        return counts
    if isinstance(counts, Path):
        return str(counts)
    return str(counts)


def format_summary(results: list[StageResult]) -> str:
    """A plain-text table: stage, status, seconds, key counts."""
    rows = [("stage", "status", "time", "counts")]
    for result in results:
        counts = _flat_counts(result.counts)
        rows.append((result.name, result.status, f"{result.seconds:.1f}s", counts))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    return "\n".join(lines)


def _flat_counts(counts: dict[str, Any], limit: int = 90) -> str:
    parts = []
    for key, value in counts.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int | str) and not isinstance(value, bool):
            parts.append(f"{key}={value}")
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"
