"""``runs/<project>/manifest.json``: resolved config, versions, and per-stage records.

``stages`` is what each stage says of its own work (counts, status); ``pipeline`` is what ``persllm run``
keeps to decide skips (fingerprint, status). Every update is a read-modify-write under the manifest's
own lock, written atomically, so two commands finishing together never lose each other's update and a
killed one never leaves half a file.
"""

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from persllm import __version__
from persllm.config import Project, Workspace
from persllm.errors import UserError
from persllm.layout import RunLayout, file_lock, write_json_atomic


def git_revision(start: Path | None = None) -> str | None:
    """The git revision of the persllm checkout (or of ``start``), or None outside a checkout."""
    where = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest of ``run_dir`` (empty sections when there is none yet)."""
    path = RunLayout(run_dir).manifest
    if not path.exists():
        return {"stages": {}, "pipeline": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(
            f"{path}: not valid JSON (edited by hand?); restore it or move it aside, and re-run"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; restore it or move it aside, and re-run")
    data.setdefault("stages", {})
    data.setdefault("pipeline", {})
    return data


def _lock_path(run_dir: Path) -> Path:
    return RunLayout(run_dir).manifest.with_name(".manifest.lock")


def write_manifest(project: Project) -> Path:
    """Refresh the config/version part of the manifest, keeping the stage records (every command that
    writes to the run folder does this first)."""
    with file_lock(_lock_path(project.run_dir)):
        manifest = load_manifest(project.run_dir)
        manifest["config"] = project.resolved()
        return _write(project.workspace, manifest)


def _write(workspace: Workspace, manifest: dict[str, Any]) -> Path:
    manifest.update(
        {
            "persllm_version": __version__,
            "git_revision": git_revision(),
            "config_path": str(workspace.config_path),
        }
    )
    path = workspace.layout.manifest
    write_json_atomic(path, manifest)
    return path


def record_stage(workspace: Workspace, stage: str, *, section: str = "stages", **info: Any) -> None:
    """Merge ``info`` into the stage's manifest entry.

    ``section="stages"`` is what each stage says of its own work (counts, status); ``section="pipeline"``
    is what ``persllm run`` keeps to decide skips (fingerprint, status), kept apart so a stage's own
    bookkeeping can never make the pipeline skip an unfinished stage.
    """
    with file_lock(_lock_path(workspace.run_dir)):
        manifest = load_manifest(workspace.run_dir)
        entries = manifest.setdefault(section, {})
        entry = entries.get(stage, {})
        entry.update(info)
        entry["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        entries[stage] = entry
        _write(workspace, manifest)
