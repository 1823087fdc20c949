"""``data/<persona>/stats.json``: one top-level key per stage that writes it (curate, pairs), merged."""

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persllm.curate.filters import REMOVALS
from persllm.layout import write_json_atomic

if TYPE_CHECKING:
    from persllm.config.curate import CurateConfig
    from persllm.curate.format import CotMode
    from persllm.prompting import SystemStyle


def update_stats(path: Path, key: str, value: dict[str, Any]) -> None:
    """Replace ``key`` in the stats file, keeping the other stages' keys; written atomically."""
    stats: dict[str, Any] = {}
    if path.exists():
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            stats = {}  # a stats file is derived data: a broken one is rebuilt, not an error
    stats[key] = value
    write_json_atomic(path, stats)


def read_stats(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


class CurateCounts:
    """Per stratum (``stage/kind``) counters: input, removed by each filter, kept, train, test."""

    def __init__(self) -> None:
        self.strata: dict[str, Counter[str]] = {}

    def add(self, stage: str, kind: str, what: str, n: int = 1) -> None:
        self.strata.setdefault(f"{stage}/{kind}", Counter())[what] += n

    def summary(self, train_rows: int, general_rows: int, test_rows: int) -> dict[str, Any]:
        by_stratum = {key: self._entry(counts) for key, counts in sorted(self.strata.items())}
        total: Counter[str] = Counter()
        for counts in self.strata.values():
            total.update(counts)
        return {
            **self._entry(total),
            "train_rows": train_rows,
            "general_rows": general_rows,
            "test_rows": test_rows,
            "by_stratum": by_stratum,
        }

    @staticmethod
    def _entry(counts: Counter[str]) -> dict[str, Any]:
        return {
            "input": counts["input"],
            "removed": {name: counts[name] for name in REMOVALS},
            "kept": counts["kept"],
            "train": counts["train"],
            "test": counts["test"],
        }


def curated_format(stats_path: Path, cfg: "CurateConfig") -> tuple["CotMode", "SystemStyle"]:
    """The CoT mode and system prompt style the SFT data was written with (pairs must match them,
    whatever the config says now)."""
    curated = read_stats(stats_path).get("curate", {})
    cot, style = curated.get("cot"), curated.get("system_prompt")
    return (
        cot if cot in ("inline", "none") else cfg.cot,
        style if style in ("full", "brief") else cfg.system_prompt,
    )
