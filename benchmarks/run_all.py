"""Run every benchmark and write benchmarks/results.md: a table per benchmark, the machine, the date.

Each benchmark script prints its own table and writes ``benchmarks/out/<name>.json``; this runner only
collects them. ``--only NAME`` runs one; ``--collect`` skips running and rebuilds results.md.
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
BENCHMARKS = [
    "retrieval",
    "annotate_throughput",
    "dedup",
    "train_throughput",
    "generation",
    "structured_output",
    "serve",
    "stage_labels",  # two demo runs (text labels, new tokens) unless they exist: about 40 minutes
    "personification",  # --size small here (about 35 minutes); --size full by hand, at most 2 hours
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, {platform.system()}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def tables(data: Any) -> list[str]:
    """Markdown tables for every list of flat dicts in ``data``; other scalars as a key/value table."""
    lines: list[str] = []
    scalars: dict[str, Any] = {}
    items = data.items() if isinstance(data, dict) else [("rows", data)]
    for key, value in items:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for row in value for k in row))
            lines += [f"*{key}*", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in value]
            lines.append("")
        elif isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if not isinstance(sub_value, dict | list):
                    scalars[f"{key}.{sub_key}"] = sub_value
        else:
            scalars[key] = value
    if scalars:
        lines += ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in scalars.items()]
        lines.append("")
    return lines


def main(argv: list[str]) -> int:
    names = BENCHMARKS
    if "--only" in argv:
        names = [argv[argv.index("--only") + 1]]
    failed = []
    if "--collect" not in argv:
        for name in names:
            print(f"== {name}", flush=True)
            began = time.perf_counter()
            code = subprocess.call([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent)
            print(f"== {name}: exit {code} in {time.perf_counter() - began:.0f}s", flush=True)
            if code:
                failed.append(name)
    lines = ["# Benchmark results", "", f"Date: {time.strftime('%Y-%m-%d')}. Machine: {machine()}.", ""]
    for name in BENCHMARKS:
        path = OUT / f"{name}.json"
        lines.append(f"## {name}")
        lines.append("")
        if not path.exists():
            lines += ["(not run)", ""]
            continue
        lines += tables(json.loads(path.read_text()))
    (HERE / "results.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {HERE / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
