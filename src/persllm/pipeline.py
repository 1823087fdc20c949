"""``persllm run``: every stage in order, skipping those whose inputs and resolved config are unchanged.

A stage's fingerprint is a hash of the config sections it reads and of the files the stages before it
wrote. The manifest keeps, under ``pipeline``, the fingerprint of each stage's last run and its status; a
stage whose fingerprint matches and whose status is ``done`` is skipped. A stage that was interrupted or
left items missing (status ``running``, ``interrupted`` or ``partial`` with the same fingerprint) is
resumed: annotation writes only the missing records, training continues from its last checkpoint. A
stage that still misses items after one more try stops the run (exit 3) unless ``allow_partial``. A
stage whose fingerprint changed starts clean, with its old outputs moved aside (never deleted), and
everything after it re-runs only if its outputs change. Every setting a selected stage will use is
checked before the first stage runs.
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm import annotate, curate, evaluate, index, pairs
from persllm.checks import check_before_run
from persllm.config import Project, Workspace
from persllm.config.stages import (
    AnnotateSettings,
    CurateSettings,
    DPOSettings,
    EvalSettings,
    IndexSettings,
    PairsSettings,
    SFTSettings,
    StageSettings,
)
from persllm.errors import PartialStage, UserError
from persllm.hashing import file_hash, stable_hash
from persllm.layout import STAGE_INPUTS, STAGE_OUTPUTS
from persllm.manifest import load_manifest, record_stage, write_manifest
from persllm.train import dpo, sft

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
    settings: type[StageSettings]  # the sections of the project file this stage reads
    upstream: list[str]  # run-folder globs whose contents this stage reads
    outputs: list[str]  # run-folder globs this stage writes (moved aside when its inputs change)
    run: Callable[[Any, Workspace, bool], dict[str, Any]]  # (its settings, workspace, resume) -> counts

    @property
    def config_keys(self) -> list[str]:
        return self.settings.config_keys()


# --------------------------------------------------------------------------- stage runners
# Each stage gets its own settings and the workspace, never the whole project.


def _run_index(settings: IndexSettings, workspace: Workspace, resume: bool) -> dict[str, Any]:
    return index.run(settings, workspace)


def _run_annotate(settings: AnnotateSettings, workspace: Workspace, resume: bool) -> dict[str, Any]:
    return annotate.run(settings, workspace)


def _run_curate(settings: CurateSettings, workspace: Workspace, resume: bool) -> dict[str, Any]:
    return curate.run(settings, workspace)


def _run_pairs(settings: PairsSettings, workspace: Workspace, resume: bool) -> dict[str, Any]:
    return pairs.run(settings, workspace)


def _run_sft(settings: SFTSettings, workspace: Workspace, resume: bool) -> dict[str, Any]:
    personas = workspace.personas
    return training_counts({pid: sft.run(settings, workspace, pid, resume=resume) for pid in personas})


def _run_dpo(settings: DPOSettings, workspace: Workspace, resume: bool) -> dict[str, Any]:
    personas = workspace.personas
    return training_counts({pid: dpo.run(settings, workspace, pid, resume=resume) for pid in personas})


def _run_eval(settings: EvalSettings, workspace: Workspace, resume: bool) -> dict[str, Any]:
    result = evaluate.run(settings, workspace)
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


SETTINGS: dict[str, type[StageSettings]] = {
    "index": IndexSettings,
    "annotate": AnnotateSettings,
    "curate": CurateSettings,
    "pairs": PairsSettings,
    "sft": SFTSettings,
    "dpo": DPOSettings,
    "eval": EvalSettings,
}
RUNNERS: dict[str, Callable[[Any, Workspace, bool], dict[str, Any]]] = {
    "index": _run_index,
    "annotate": _run_annotate,
    "curate": _run_curate,
    "pairs": _run_pairs,
    "sft": _run_sft,
    "dpo": _run_dpo,
    "eval": _run_eval,
}
STAGES = [
    Stage(name, SETTINGS[name], STAGE_INPUTS[name], STAGE_OUTPUTS[name], RUNNERS[name])
    for name in STAGE_NAMES
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
        workspace = project.workspace
        for pid in project.personas:
            for st in project.personas[pid].stages:
                for kind in ("knowledge", "style", "dialogue"):
                    for path in workspace.stage_files(pid, st.id, kind):
                        persona_inputs[f"{pid}/{st.id}/{kind}/{path.name}"] = file_hash(path)
            for path in workspace.dated_dialogue_files(pid):
                persona_inputs[f"{pid}/dialogue/{path.name}"] = file_hash(path)
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
    target = project.layout.stale(stage.name, old_hash)
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
    allow_partial: bool = False,
) -> list[StageResult]:
    """Run the stages from ``start`` to ``stop`` (inclusive); ``start`` forces that stage to re-run.

    Raises:
        PartialStage: a stage still misses items after a second try (unless ``allow_partial``).
    """

    selected = select(start, stop)
    check_before_run(project, [stage.name for stage in selected])
    write_manifest(project)
    results: list[StageResult] = []
    for stage in selected:
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
        began = time.perf_counter()
        counts = run_stage(project, stage, current, resume)
        if counts.get("status") == "partial":
            # One more try at the missing items only (model errors are not cached, so they are re-asked).
            if on_stage:
                on_stage(stage.name, f"{counts.get('missing', '?')} items missing; trying them again")
            counts = run_stage(project, stage, current, True)
        seconds = round(time.perf_counter() - began, 2)
        partial = counts.get("status") == "partial"
        if partial and not allow_partial:
            record_stage(
                project.workspace, stage.name, section="pipeline", fingerprint=current, status="partial"
            )
            raise PartialStage(partial_message(project, stage.name, counts))
        record_stage(
            project.workspace,
            stage.name,
            section="pipeline",
            fingerprint=current,
            status="done",
            allowed_partial=partial,
            seconds=seconds,
            peak_rss_mb=peak_rss_mb(),
            counts=_jsonable(counts),
        )
        results.append(StageResult(stage.name, "resumed" if resume else "ran", seconds, counts))
    return results


def run_stage(project: Project, stage: Stage, current: str, resume: bool) -> dict[str, Any]:
    """Run one stage, recording it as running, and as interrupted if it is stopped."""
    record_stage(project.workspace, stage.name, section="pipeline", fingerprint=current, status="running")
    try:
        return stage.run(stage.settings.of(project.config), project.workspace, resume)
    except KeyboardInterrupt:
        record_stage(
            project.workspace, stage.name, section="pipeline", fingerprint=current, status="interrupted"
        )
        raise
    except Exception:
        record_stage(project.workspace, stage.name, section="pipeline", fingerprint=current, status="failed")
        raise
    finally:
        release_memory()


def peak_rss_mb() -> int:
    """The process's peak resident memory so far (MB): recorded after each stage, so the manifest shows
    which stage raised it."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


def release_memory() -> None:
    """Give back what a finished stage's models held before the next stage loads its own."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def partial_message(project: Project, stage: str, counts: dict[str, Any]) -> str:
    """One line: what is missing, why, and the commands that finish it or go on without it."""
    why = counts.get("first_error") or "see the failures list"
    return (
        f"{stage}: {counts.get('missing', '?')} of {counts.get('planned', '?')} items still missing after a "
        f"second try ({why}); `persllm failures {project.config_path}` lists them; fix the cause and run "
        f"`persllm run {project.config_path}` again, or go on without them with --allow-partial"
    )


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
