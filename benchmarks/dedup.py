"""Near-duplicate removal at scale: persllm's blocked dedup against the reference greedy loop.

Embeddings are random but clustered (topics, each item a noisy copy of its topic centre, pairwise cosine
about 0.5 inside a topic) with planted near-duplicates (cosine about 0.98 to their original), dim 384.

    .venv/bin/python benchmarks/dedup.py [--n 50000] [--ref-n 5000] [--threshold 0.95]

Prints a table and writes benchmarks/out/dedup.json.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from persllm.curate.dedup import dedup

DIM = 384
OUT = Path(__file__).resolve().parent / "out" / "dedup.json"


def clustered(n: int, seed: int, dup_share: float = 0.1, topics: int = 2000) -> tuple[np.ndarray, int]:
    """``n`` unit vectors in shuffled order, ``dup_share`` of them near-duplicates of distinct others."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_share)
    n_base = n - n_dup
    centres = rng.standard_normal((topics, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Noise scale s gives cosine about 1 / sqrt(1 + s^2 * DIM) to the vector it perturbs.
    base = (
        centres[rng.integers(0, topics, n_base)]
        + rng.standard_normal((n_base, DIM), dtype=np.float32) * 0.052
    )
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    originals = rng.choice(n_base, size=n_dup, replace=False)
    dups = base[originals] + rng.standard_normal((n_dup, DIM), dtype=np.float32) * 0.0104
    vectors = np.concatenate([base, dups])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors[rng.permutation(n)].astype(np.float32), n_dup


def reference_greedy(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """The reference code's approach: each item against the kept array, re-concatenated on every keep."""
    kept = np.empty((0, vectors.shape[1]), dtype=np.float32)
    keep = np.zeros(len(vectors), dtype=bool)
    for index, vector in enumerate(vectors):
        if len(kept) and (kept @ vector >= threshold).any():
            continue
        kept = np.concatenate([kept, vector[None, :]])
        keep[index] = True
    return keep


def timed_dedup(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, float, float, float]:
    """(keep mask, wall seconds, CPU seconds of this process, peak MiB of arrays allocated during the call).

    CPU seconds are reported because the wall time on a shared machine depends on its load.
    """
    tracemalloc.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    keep = dedup(vectors, threshold)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return keep, seconds, cpu, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--ref-n", type=int, default=5_000)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()

    vectors, planted = clustered(args.n, seed=0)
    load_before = os.getloadavg()[0]
    keep, seconds, cpu_seconds, peak_mib = timed_dedup(vectors, args.threshold)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    small, small_planted = clustered(args.ref_n, seed=1)
    small_keep, small_seconds, _, _ = timed_dedup(small, args.threshold)
    started = time.perf_counter()
    ref_keep = reference_greedy(small, args.threshold)
    ref_seconds = time.perf_counter() - started

    result = {
        "large": {
            "n": args.n,
            "dim": DIM,
            "threshold": args.threshold,
            "planted_duplicates": planted,
            "removed": int((~keep).sum()),
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "peak_array_mib": round(peak_mib, 1),
            "peak_rss_mib": round(rss_mib, 1),
        },
        "vs_reference": {
            "n": args.ref_n,
            "planted_duplicates": small_planted,
            "removed": int((~small_keep).sum()),
            "same_result": bool((small_keep == ref_keep).all()),
            "persllm_seconds": round(small_seconds, 4),
            "reference_seconds": round(ref_seconds, 3),
            "speedup": round(ref_seconds / max(small_seconds, 1e-9), 1),
        },
        "machine": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "load_average_before": round(load_before, 2),
            "cpu": platform.processor(),
        },
    }
    large, cmp = result["large"], result["vs_reference"]
    print(f"{'case':<28}{'n':>8}{'removed':>9}{'planted':>9}{'seconds':>10}{'cpu s':>8}{'peak MiB':>10}")
    print(
        f"{'persllm blocked dedup':<28}{large['n']:>8}{large['removed']:>9}{large['planted_duplicates']:>9}"
        f"{large['seconds']:>10.2f}{large['cpu_seconds']:>8.1f}{large['peak_array_mib']:>10.0f}"
    )
    print(
        f"{'persllm blocked dedup':<28}{cmp['n']:>8}{cmp['removed']:>9}{cmp['planted_duplicates']:>9}"
        f"{cmp['persllm_seconds']:>10.3f}{'':>18}"
    )
    print(
        f"{'reference greedy loop':<28}{cmp['n']:>8}{int((~ref_keep).sum()):>9}{cmp['planted_duplicates']:>9}"
        f"{cmp['reference_seconds']:>10.3f}{'':>18}"
    )
    print(
        f"speedup at {cmp['n']}: {cmp['speedup']}x, same keep mask: {cmp['same_result']}; "
        f"peak RSS {rss_mib:.0f} MiB; load average {load_before:.1f} on {os.cpu_count()} CPUs"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
