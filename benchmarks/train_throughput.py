"""SFT throughput on this CPU: SmolLM2-135M through persllm's own ``sft.run`` (LoRA + stage tokens).

Three ways to batch the same variable-length dialogues (built from the demo corpus, about 50-300 tokens):
padded batches (TRL's default), padding-free batches (``padding_free=True``: the batch is one flat
sequence, position ids mark the boundaries), and packed batches (``packing=True``, best-fit decreasing
into ``max_length`` bins, padding-free as well). Each mode trains one epoch over the same rows in its own
process, so peak RSS is per mode. Tokens/s counts real (non-padding) tokens: the chat-template length
of every row, summed, over the trainer's own ``train_runtime``.

Model-FLOPs utilisation uses the usual 6 x parameters x tokens/s (forward + backward) over the CPU's
peak, measured here as the best fp32 ``torch.mm`` rate at 2048^2 on all threads; the nominal peak of the
cores (from lscpu) is printed beside it. LoRA skips the frozen weights' gradients, so the 6N count
overstates the work done by roughly a third: read MFU as "of the full fine-tuning budget".

    .venv/bin/python benchmarks/train_throughput.py [--rows 12] [--batch 4] [--repeats 2]

Prints a table and writes benchmarks/out/train_throughput.json.
"""

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "train_throughput.json"
CORPUS = REPO / "examples" / "demo" / "corpus"
MODES: dict[str, dict[str, Any]] = {
    "padded": {"padding_free": False, "packing": False},
    "padding_free": {"padding_free": True, "packing": False, "max_length": None},
    # Bins of 512 tokens, two per step: about the tokens of one padding-free step of four rows. Without
    # FlashAttention's varlen kernel the flattened batch pays full attention over its whole length, so
    # bigger bins cost quadratically more (1024-token bins x4 measured 0.3x padded and 18 GB).
    "packed": {
        "packing": True,
        "packing_strategy": "bfd",
        "max_length": 512,
        "per_device_train_batch_size": 2,
    },
}


def sentences() -> list[str]:
    text = " ".join(path.read_text(encoding="utf-8") for path in sorted(CORPUS.rglob("*.md")))
    text = re.sub(r"[#*\n]+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) > 4]


def build_project(root: Path, rows: int, seed: int = 0) -> Path:
    """A one-persona project whose sft_train.jsonl holds ``rows`` dialogues of widely varying length."""
    rng = random.Random(seed)
    pool = sentences()
    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "k.md").write_text("Material.\n", encoding="utf-8")
    persona = {
        "id": "bench",
        "name": "Bench",
        "stages": [
            {"id": "early", "time": "It is 1889.", "knowledge": ["corpus/k.md"]},
            {"id": "late", "time": "It is 1905.", "knowledge": ["corpus/k.md"]},
        ],
    }
    (root / "bench.yaml").write_text(yaml.safe_dump(persona), encoding="utf-8")
    config = {"project": "bench", "personas": ["bench.yaml"], "base_model": {"model": "bundled:smollm2"}}
    (root / "persllm.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    data = root / "runs" / "bench" / "data" / "bench"
    data.mkdir(parents=True)
    with (data / "sft_train.jsonl").open("w", encoding="utf-8") as handle:
        for index in range(rows):
            label = "<TIME-I>" if index % 2 == 0 else "<TIME-II>"
            answer = " ".join(rng.sample(pool, rng.randint(1, 8)))
            thought = rng.choice(pool)
            messages = [
                {"role": "system", "content": "You are a lighthouse keeper on the north coast."},
                {"role": "user", "content": f"{label} {rng.choice(pool)} What do you make of that?"},
                {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n{answer}"},
            ]
            handle.write(json.dumps({"messages": messages, "meta": {"id": str(index)}}) + "\n")
    return root / "persllm.yaml"


def worker(config: str, mode: str, batch: int) -> dict[str, Any]:
    """One training epoch in this process; returns tokens/s and peak RSS."""
    from transformers import AutoTokenizer

    from persllm.config import load_project
    from persllm.jsonl import read_jsonl
    from persllm.train import sft

    project = load_project(config)
    overrides = {
        "num_train_epochs": 1,
        "per_device_train_batch_size": batch,
        "logging_steps": 1,
        "save_strategy": "no",
        "learning_rate": 1e-4,
        **MODES[mode],
    }
    info = sft.run(project, "bench", **overrides)
    tokenizer = AutoTokenizer.from_pretrained(info["output"])
    rows = read_jsonl(project.run_dir / "data" / "bench" / "sft_train.jsonl")
    lengths = [
        len(tokenizer.apply_chat_template(row["messages"], return_dict=True)["input_ids"]) for row in rows
    ]
    seconds = info["train_seconds"]
    return {
        "mode": mode,
        "steps": info["steps"],
        "rows": len(rows),
        "real_tokens": sum(lengths),
        "padded_tokens": _padded_tokens(lengths, batch) if mode == "padded" else sum(lengths),
        "min_len": min(lengths),
        "max_len": max(lengths),
        "train_seconds": seconds,
        "tokens_per_second": sum(lengths) / seconds,
        "final_loss": info["final_loss"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": _threads(),
    }


def _padded_tokens(lengths: list[int], batch: int) -> int:
    """Tokens actually computed by padded batches (dataset order, no length grouping)."""
    return sum(
        max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch)
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def matmul_peak(size: int = 2048, seconds: float = 4.0) -> float:
    """Best fp32 GEMM rate over a few seconds, in FLOP/s (the practical peak of these cores)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best, deadline = 0.0, time.time() + seconds
    torch.mm(a, b)
    while time.time() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def nominal_peak() -> tuple[float | None, str]:
    """Cores x clock x 32 fp32 FLOP/cycle (two 256-bit FMA pipes, as on AMD Zen 4 and recent Intel cores)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, "lscpu unavailable"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    cpus = int(fields.get("CPU(s)", "0").strip() or 0)
    mhz = fields.get("CPU max MHz") or fields.get("CPU MHz")
    if mhz is None and "BogoMIPS" in fields:
        mhz = str(float(fields["BogoMIPS"]) / 2)  # BogoMIPS is twice the clock on x86
    if not cpus or mhz is None:
        return None, "clock unknown"
    model = fields.get("Model name", "?").strip()
    return cpus * float(mhz) * 1e6 * 32, f"{cpus} x {float(mhz):.0f} MHz x 32 FLOP/cycle ({model})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12, help="Dialogues in the training set.")
    parser.add_argument("--batch", type=int, default=4, help="Rows per batch (padded and padding-free).")
    parser.add_argument(
        "--repeats", type=int, default=2, help="Interleaved rounds; the best run per mode counts."
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.config, args.worker, args.batch)))
        return

    from persllm.llm.bundled import resolve_model

    params = parameters(resolve_model("bundled:smollm2"))
    nominal, how = nominal_peak()
    peaks: list[float] = []
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = build_project(Path(tmp), args.rows)
        # Rounds interleave the modes so a burst of load from other processes hits all of them alike.
        for round_index in range(args.repeats):
            peaks.append(matmul_peak())
            for mode in MODES:
                result = run_worker(config, mode, args.batch)
                result["round"] = round_index
                runs.append(result)
                print(
                    f"  round {round_index + 1} {mode}: {result['tokens_per_second']:.0f} tokens/s",
                    file=sys.stderr,
                )
    measured = max(peaks)
    results = [
        max((r for r in runs if r["mode"] == mode), key=lambda r: r["tokens_per_second"]) for mode in MODES
    ]
    for result in results:
        result["speedup_vs_padded"] = result["tokens_per_second"] / results[0]["tokens_per_second"]
        result["mfu_measured_peak"] = 6 * params * result["tokens_per_second"] / measured
        result["mfu_nominal_peak"] = 6 * params * result["tokens_per_second"] / nominal if nominal else None
    report = {
        "model": "SmolLM2-135M-Instruct (bundled), LoRA r=16 all-linear + trained embeddings (stage tokens)",
        "parameters": params,
        "rows": args.rows,
        "batch": args.batch,
        "repeats": args.repeats,
        "peak_flops_measured": measured,
        "peak_flops_nominal": nominal,
        "nominal_peak_from": how,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "peaks_measured": peaks,
        "results": results,
        "all_runs": runs,
    }
    print(table(report))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


def run_worker(config: Path, mode: str, batch: int) -> dict[str, Any]:
    """One mode in a fresh process (its own peak RSS); the result line it prints, parsed."""
    command = [sys.executable, __file__, "--worker", mode, "--config", str(config), "--batch", str(batch)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def parameters(folder: str) -> int:
    """Parameters stored in the model's safetensors files (tied embeddings counted once)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += prod(handle.get_slice(key).get_shape())
    return total


def table(report: dict[str, Any]) -> str:
    columns = ["mode", "steps", "real tok", "computed", "tok/s", "x padded", "MFU", "peak RSS"]
    rows = [
        [
            r["mode"],
            str(r["steps"]),
            str(r["real_tokens"]),
            str(r["padded_tokens"]),
            f"{r['tokens_per_second']:.1f}",
            f"{r['speedup_vs_padded']:.2f}",
            f"{100 * r['mfu_measured_peak']:.1f}%",
            f"{r['peak_rss_mb']:.0f} MB",
        ]
        for r in report["results"]
    ]
    widths = [max(len(row[i]) for row in [columns, *rows]) for i in range(len(columns))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [columns, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    nominal = (report["peak_flops_nominal"] or 0) / 1e9
    lines.append(
        f"MFU = 6 x {report['parameters'] / 1e6:.1f}M params x tok/s / measured fp32 GEMM peak "
        f"{report['peak_flops_measured'] / 1e9:.0f} GFLOP/s"
    )
    lines.append(f"nominal peak {nominal:.0f} GFLOP/s = {report['nominal_peak_from']}")
    lines.append(
        f"best of {report['repeats']} interleaved rounds per mode; load average at the end "
        f"{report['load_average'][0]:.1f} on {report['cores']} cores (the machine is shared)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
