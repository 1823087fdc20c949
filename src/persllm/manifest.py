"""``runs/<project>/manifest.json``: resolved config, versions, and per-stage fingerprints and status.

The pipeline compares a stage's ``input_hash`` with the one recorded here to decide whether it can be
skipped. Writes are atomic (temporary file + rename) so a killed run never leaves half a manifest.
"""

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from persllm import __version__
from persllm.config import Project

MANIFEST = "manifest.json"


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
    path = run_dir / MANIFEST
    if not path.exists():
        return {"stages": {}, "pipeline": {}}
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("stages", {})
    data.setdefault("pipeline", {})
    return data


def write_manifest(project: Project) -> Path:
    """Refresh the config/version part of the manifest, keeping the stage records."""
    return _write(project, load_manifest(project.run_dir))


def _write(project: Project, manifest: dict[str, Any]) -> Path:
    run_dir = project.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest.update(
        {
            "persllm_version": __version__,
            "git_revision": git_revision(),
            "config_path": str(project.config_path),
            "config": project.resolved(),
        }
    )
    path = run_dir / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def record_stage(project: Project, stage: str, *, section: str = "stages", **info: Any) -> None:
    """Merge ``info`` into the stage's manifest entry.

    ``section="stages"`` is what each stage says of its own work (counts, status, its own input hash);
    ``section="pipeline"`` is what ``persllm run`` keeps to decide skips (fingerprint, status), kept
    apart so a stage's own bookkeeping can never make the pipeline skip an unfinished stage.
    """
    manifest = load_manifest(project.run_dir)
    entries = manifest.setdefault(section, {})
    entry = entries.get(stage, {})
    entry.update(info)
    entry["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    entries[stage] = entry
    _write(project, manifest)
