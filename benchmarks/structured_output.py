"""Parse failures of the one-call reply layout, with and without grammar-constrained JSON (llama.cpp).

The bundled example is annotated with annotator-written dialogues only (no own words) by SmolLM2-135M in
llama.cpp, ``annotate.output: json`` (one call returns the analysis and the response), twice on the same
plan: ``annotator.structured_output: json_schema`` (llama.cpp turns the schema into a grammar, so every
reply is valid JSON of the schema) and ``off`` with ``output: delimited`` (the same one-call layout as
ANALYSIS:/RESPONSE: labels, parsed from free text: what a backend without grammars gets). Reports, per
setting, the attempts whose reply could not be parsed, the items that stayed malformed after every
attempt, calls and seconds.

    .venv/bin/python benchmarks/structured_output.py [--per-stage 4] [--max-attempts 2]

Prints a table and writes benchmarks/out/structured_output.json.
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "demo"
OUT = HERE / "out" / "structured_output.json"
SETTINGS = {
    "json_schema": {"output": "json", "structured_output": "json_schema"},
    "off (delimited)": {"output": "delimited", "structured_output": "off"},
}


def project(root: Path, per_stage: int, attempts: int, setting: dict[str, str]) -> Path:
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("runs"))
    config = yaml.safe_load((root / "persllm.yaml").read_text())
    config.pop("presets", None)
    config["annotator"].update(
        {
            "backend": "llamacpp",
            "structured_output": setting["structured_output"],
            "params": {"temperature": 0.7, "max_tokens": 160},
        }
    )
    config["annotate"].update(
        {
            "counts": {"ordinary": per_stage // 2, "misleading": per_stage // 4, "opinion": per_stage // 4},
            "own_words_share": {"ordinary": 0.0, "opinion": 0.0},
            "heldout_questions": False,
            "output": setting["output"],
            "max_attempts": attempts,
        }
    )
    (root / "persllm.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "persllm.yaml"


def run(config: Path) -> dict[str, Any]:
    """Index, then annotate in this process; the annotation summary with its malformed counts."""
    from persllm import annotate, index
    from persllm.config import load_project

    loaded = load_project(config)
    index.run(loaded)
    began = time.perf_counter()
    summary = annotate.run(loaded, progress=False)
    return {**summary, "seconds": round(time.perf_counter() - began, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-stage", type=int, default=4, help="annotator-written dialogues per stage")
    parser.add_argument("--max-attempts", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, setting in SETTINGS.items():
            config = project(Path(scratch) / name.split()[0], args.per_stage, args.max_attempts, setting)
            got = run(config)
            planned, done = int(got.get("planned", 0)), int(got.get("done", 0))
            malformed = sum((got.get("malformed") or {}).values())
            calls = int(got.get("calls", 0))
            rows.append(
                {
                    "structured_output": name,
                    "items": planned,
                    "written": done,
                    "failed_items": planned - done,
                    "unparseable_attempts": malformed,
                    "calls": calls,
                    "unparseable_share": round(malformed / calls, 3) if calls else None,
                    "seconds": got["seconds"],
                }
            )
    result = {
        "rows": rows,
        "settings": {
            "annotator": "bundled:smollm2 (llamacpp)",
            "per_stage": args.per_stage,
            "max_attempts": args.max_attempts,
            "max_tokens": 160,
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    header = (
        f"{'structured_output':<18}{'items':>6}{'written':>8}{'unparsed':>9}{'calls':>6}{'share':>7}{'s':>7}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['structured_output']:<18}{row['items']:>6}{row['written']:>8}{row['unparseable_attempts']:>9}"
            f"{row['calls']:>6}{row['unparseable_share']!s:>7}{row['seconds']:>7}"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
