"""SFT throughput on this CPU: SmolLM2-135M through persllm's own ``sft.run`` (LoRA + stage tokens).

Three ways to batch the same variable-length dialogues (built from the demo corpus, about 50-300 tokens):
padded batches (TRL's default), padding-free batches (``padding_free=True``: the batch is one flat
sequence, position ids mark the boundaries), and packed batches (``packing=True``, best-fit decreasing
into 512-token bins, padding-free as well). Each mode trains one epoch over the same rows in its own
process, so peak RSS is per mode. Real tokens are the chat-template lengths of the rows, summed.

This machine is shared, so wall-clock rates swing with other people's load. The trainer's ``train`` call
is therefore also timed in CPU seconds of this process (``time.process_time``) with torch on
``--threads`` threads (default 1, so no thread spins waiting for a descheduled sibling): tokens per
CPU-second measures the work, whoever else is running. Wall-clock tokens/s is reported beside it.

Model-FLOPs utilisation uses the usual 6 x parameters x tokens (forward + backward) over the peak of the
same threads, measured here as the best fp32 ``torch.mm`` rate at 2048^2 per CPU-second; the nominal
peak of one core (lscpu clock x 32 fp32 FLOP/cycle, two 256-bit FMA pipes) is printed beside it. LoRA
skips the frozen weights' gradients, so 6N overstates the work by roughly a third: read MFU as "of the
full fine-tuning budget".

    .venv/bin/python benchmarks/train_throughput.py [--rows 8] [--batch 4] [--threads 1] [--repeats 1]

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
from math import prod
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
    # FlashAttention's varlen kernel a flattened batch pays attention over its whole length, so bigger
    # bins cost quadratically more (1024-token bins x4 measured 0.3x padded and 18 GB).
    "packed": {
        "packing": True,
        "packing_strategy": "bfd",
        "max_length": 512,
        "per_device_train_batch_size": 2,
    },
}


# --------------------------------------------------------------------------- data


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
            messages = [
                {"role": "system", "content": "You are a lighthouse keeper on the north coast."},
                {"role": "user", "content": f"{label} {rng.choice(pool)} What do you make of that?"},
                {"role": "assistant", "content": f"<think>\n{rng.choice(pool)}\n</think>\n{answer}"},
            ]
            handle.write(json.dumps({"messages": messages, "meta": {"id": str(index)}}) + "\n")
    return root / "persllm.yaml"


# --------------------------------------------------------------------------- one mode, in its own process


def worker(config: str, mode: str, batch: int, threads: int) -> dict[str, Any]:
    """One training epoch; returns wall and CPU-time throughput and peak RSS."""
    import torch
    import trl
    from transformers import AutoTokenizer

    from persllm.config import load_project
    from persllm.jsonl import read_jsonl
    from persllm.train import sft

    torch.set_num_threads(threads)
    timing: dict[str, float] = {}
    original = trl.SFTTrainer.train

    def timed_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        cpu, wall = time.process_time(), time.perf_counter()
        result = original(self, *args, **kwargs)
        timing.update(cpu=time.process_time() - cpu, wall=time.perf_counter() - wall)
        return result

    trl.SFTTrainer.train = timed_train  # type: ignore[method-assign]
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
    rows = read_jsonl(project.layout.sft_train("bench"))
    lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]
    real = sum(lengths)
    return {
        "mode": mode,
        "steps": info["steps"],
        "rows": len(rows),
        "real_tokens": real,
        "computed_tokens": padded_tokens(lengths, batch) if mode == "padded" else real,
        "min_len": min(lengths),
        "max_len": max(lengths),
        "wall_seconds": timing["wall"],
        "cpu_seconds": timing["cpu"],
        "tokens_per_second": real / timing["wall"],
        "tokens_per_cpu_second": real / timing["cpu"],
        "final_loss": info["final_loss"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": threads,
    }


def padded_tokens(lengths: list[int], batch: int) -> int:
    """Tokens padded batches compute (dataset order, no length grouping)."""
    chunks = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
    return sum(max(chunk) * len(chunk) for chunk in chunks)


def run_worker(config: Path, mode: str, batch: int, threads: int) -> dict[str, Any]:
    """One mode in a fresh process (its own peak RSS); the result line it prints, parsed."""
    command = [sys.executable, __file__, "--worker", mode, "--config", str(config)]
    command += ["--batch", str(batch), "--threads", str(threads)]
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


# --------------------------------------------------------------------------- peaks


def matmul_peak(threads: int, size: int = 2048, seconds: float = 4.0) -> float:
    """Best fp32 GEMM rate on ``threads`` threads, in FLOP per CPU-second of this process."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best, deadline = 0.0, time.time() + seconds
    torch.mm(a, b)
    while time.time() < deadline:
        start = time.process_time()
        torch.mm(a, b)
        spent = time.process_time() - start
        if spent > 0:
            best = max(best, 2 * size**3 / spent)
    return best


def nominal_core_peak() -> tuple[float | None, str]:
    """One core's clock x 32 fp32 FLOP/cycle (two 256-bit FMA pipes, as on AMD Zen 4 and recent Intel)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, "lscpu unavailable"
    fields = {
        key.strip(): value.strip()
        for key, value in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)
    }
    mhz = fields.get("CPU max MHz") or fields.get("CPU MHz")
    if mhz is None and "BogoMIPS" in fields:
        mhz = str(float(fields["BogoMIPS"]) / 2)  # BogoMIPS is twice the clock on x86
    if mhz is None:
        return None, "clock unknown"
    return float(mhz) * 1e6 * 32, f"{float(mhz):.0f} MHz x 32 FLOP/cycle ({fields.get('Model name', '?')})"


def parameters(folder: str) -> int:
    """Parameters stored in the model's safetensors files (tied embeddings counted once)."""
    from safetensors import safe_open

    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += prod(handle.get_slice(key).get_shape())
    return total


# --------------------------------------------------------------------------- report


def table(report: dict[str, Any]) -> str:
    columns = [
        "mode",
        "steps",
        "real tok",
        "computed",
        "tok/s wall",
        "tok/CPU-s",
        "x padded",
        "MFU",
        "peak RSS",
    ]
    rows = [
        [
            r["mode"],
            str(r["steps"]),
            str(r["real_tokens"]),
            str(r["computed_tokens"]),
            f"{r['tokens_per_second']:.1f}",
            f"{r['tokens_per_cpu_second']:.1f}",
            f"{r['speedup_vs_padded']:.2f}",
            f"{100 * r['mfu']:.1f}%",
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
    threads = report["threads"]
    lines.append(
        f"x padded and MFU use tokens per CPU-second; MFU = 6 x {report['parameters'] / 1e6:.1f}M params x "
        f"tok/CPU-s / {report['peak_flops'] / 1e9:.1f} GFLOP per CPU-second (best fp32 2048^2 GEMM, "
        f"{threads} thread{'s' if threads > 1 else ''})"
    )
    nominal = report["nominal_core_peak"]
    if nominal:
        lines.append(f"nominal one-core peak {nominal / 1e9:.0f} GFLOP/s = {report['nominal_from']}")
    lines.append(
        f"best of {report['repeats']} interleaved round(s) per mode; load average "
        f"{report['load_average'][0]:.1f} on {report['cores']} shared cores"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="Dialogues in the training set.")
    parser.add_argument("--batch", type=int, default=4, help="Rows per batch (padded and padding-free).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process.")
    parser.add_argument(
        "--repeats", type=int, default=1, help="Interleaved rounds; the best run per mode counts."
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.config, args.worker, args.batch, args.threads)))
        return

    from persllm.bundled import resolve_model

    params = parameters(resolve_model("bundled:smollm2"))
    nominal, nominal_from = nominal_core_peak()
    peaks: list[float] = []
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = build_project(Path(tmp), args.rows)
        # Rounds interleave the modes so a burst of load from other processes hits all of them alike.
        for round_index in range(args.repeats):
            peaks.append(matmul_peak(args.threads))
            for mode in MODES:
                result = {**run_worker(config, mode, args.batch, args.threads), "round": round_index}
                runs.append(result)
                rate = result["tokens_per_cpu_second"]
                print(f"  round {round_index + 1} {mode}: {rate:.1f} tokens per CPU-second", file=sys.stderr)
    peak = max(peaks)
    results = [
        max((r for r in runs if r["mode"] == m), key=lambda r: r["tokens_per_cpu_second"]) for m in MODES
    ]
    for result in results:
        result["speedup_vs_padded"] = result["tokens_per_cpu_second"] / results[0]["tokens_per_cpu_second"]
        result["mfu"] = 6 * params * result["tokens_per_cpu_second"] / peak
    report = {
        "model": "SmolLM2-135M-Instruct (bundled), LoRA r=16 all-linear + trained embeddings (stage tokens)",
        "parameters": params,
        "rows": args.rows,
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "peak_flops": peak,
        "peak_flops_rounds": peaks,
        "nominal_core_peak": nominal,
        "nominal_from": nominal_from,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "results": results,
        "all_runs": runs,
    }
    print(table(report))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
