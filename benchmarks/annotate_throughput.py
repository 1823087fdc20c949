"""Annotation throughput against a scripted OpenAI-compatible server with 200 ms per request.

A tiny one-persona project (real MiniLM index) is annotated with ``output: json`` and no follow-ups,
so every item costs exactly two calls (user input + reply). The server runs in its own process.

1. 256 items at concurrency 1, 8, 32, 64 (fresh cache each time): items/s and speed-up over 1;
   target >= 0.8 x N up to N = 32.
2. 1,000 items annotated once, the annotations deleted, then re-annotated from the warm SQLite
   cache (target < 3 s, zero calls reaching the server); and a plain re-run that skips them all.

    .venv/bin/python benchmarks/annotate_throughput.py [--items 256] [--warm-items 1000]

Prints a table and writes ``benchmarks/out/annotate_throughput.json``.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out" / "annotate_throughput.json"
sys.path.insert(0, str(REPO))  # for tests.fake_openai

PERSONA = """\
id: ada
name: Ada Thorne
profile: Ada Thorne works the steam ferries of Lake Marrow, blunt and careful, trusting her tide tables.
language: en
stages:
  - id: mate
    time: "It is 1890, aboard the steam ferry Heron on Lake Marrow."
    knowledge: ["../corpus/mate/*.md"]
    style: ["../corpus/mate/*.txt"]
  - id: master
    time: "It is 1904, in the harbour office at Marrow Quay."
    knowledge: ["../corpus/master/*.md"]
    style: ["../corpus/master/*.txt"]
"""
CORPUS = {
    "mate/life.md": [
        "Ada Thorne signed on as mate of the steam ferry Heron in 1887, the first woman to hold the post.",
        "The Heron crossed Lake Marrow four times a day in summer and twice a day in winter.",
        "In the storm of March 1889 the Heron lost her funnel, and Ada brought her home under sail.",
        "The ferry company paid Ada forty pounds a year, ten less than the mate before her.",
    ],
    "mate/words.txt": [
        "A lake is only a sea that has not made up its mind yet.",
        "I do not need the captain's praise. I need his soundings written down.",
    ],
    "master/life.md": [
        "In 1901 Ada became harbour master at Marrow Quay, in charge of forty berths.",
        "She had the old timber pier rebuilt in stone between 1902 and 1903.",
        "The electric lamps on the quay were lit for the first time in October 1903.",
    ],
    "master/words.txt": ["Stone does not care who paid for it, only whether it was laid true."],
}


def scripted_reply(body: dict[str, Any]) -> str:
    """A plausible annotator: JSON for schema requests, a question for user-input prompts."""
    token = uuid.uuid4().hex[:8]
    if body.get("response_format"):
        return json.dumps(
            {
                "analysis": f"The user asks about the ferry; no false premise ({token}).",
                "response": f"Twice a day ({token}).",
            }
        )
    return f"How often did the Heron cross in winter? ({token})"


def serve(port: int, latency: float) -> None:
    from tests.fake_openai import FakeOpenAI

    # One thread per connection: with 64 of them, CPython's default 5 ms GIL switch interval makes
    # waking threads queue behind each other and the server, not the annotator, becomes the limit.
    sys.setswitchinterval(0.0002)

    with FakeOpenAI(latency=latency, default_reply=scripted_reply, port=port):
        print("ready", flush=True)
        while True:
            time.sleep(3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_project(root: Path, base_url: str) -> Path:
    (root / "personas").mkdir(parents=True)
    (root / "personas" / "ada.yaml").write_text(PERSONA)
    for name, paragraphs in CORPUS.items():
        path = root / "corpus" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(paragraphs) + "\n")
    config = root / "persllm.yaml"
    config.write_text(
        "project: bench\npersonas: [personas/ada.yaml]\nseed: 1\n"
        f"annotator: {{backend: openai, model: fake, base_url: '{base_url}', max_retries: 2, timeout: 60,"
        " params: {temperature: 0.7, max_tokens: 200}}\n"
        "annotate: {output: json, multi_turn_share: 0.0}\n"
        "retrieval: {knowledge_words: 80, style_words: 40}\n"
    )
    return config


def counts_for(items: int) -> dict[str, int]:
    """Per-stage kind counts giving ``items`` items over the project's two stages."""
    per_stage = items // 2
    ordinary = per_stage // 2
    misleading = (per_stage - ordinary) // 2
    return {"ordinary": ordinary, "misleading": misleading, "opinion": per_stage - ordinary - misleading}


def annotate(config: Path, items: int, concurrency: int, fresh: bool) -> dict[str, Any]:
    from persllm.annotate import run
    from persllm.config import load_project

    project = load_project(config, {"annotate.counts": counts_for(items)})
    if fresh:
        shutil.rmtree(project.run_dir / "annotations", ignore_errors=True)
        for path in project.run_dir.glob("cache.sqlite*"):
            path.unlink()
    started = time.perf_counter()
    result = run(project, concurrency=concurrency, progress=False)
    result["wall"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--warm-items", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="Encoder threads (1: query embedding on a shared CPU)."
    )
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.latency)
        return

    import torch

    torch.set_num_threads(args.torch_threads)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--latency", str(args.latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        with tempfile.TemporaryDirectory() as tmp:
            rows, warm = run_benchmark(Path(tmp), f"http://127.0.0.1:{port}/v1", args)
    finally:
        server.terminate()
        server.wait(timeout=10)
    report(rows, warm, args)


def client_ceiling(base_url: str, items: int, concurrency: int) -> float:
    """Items/s of bare ``OpenAIBackend`` calls (two per item): no retrieval, cache or files."""
    import asyncio

    from persllm.llm.config import LLMConfig
    from persllm.llm.openai_backend import OpenAIBackend

    async def go() -> float:
        cfg = LLMConfig(backend="openai", base_url=base_url, model="fake", concurrency=concurrency)
        backend = OpenAIBackend(cfg)
        messages = [{"role": "user", "content": "How often did the Heron cross in winter?"}]
        started = time.perf_counter()
        await asyncio.gather(*(backend.generate(messages, {"max_tokens": 50}) for _ in range(2 * items)))
        seconds = time.perf_counter() - started
        await backend.aclose()
        return items / seconds

    return asyncio.run(go())


def run_benchmark(
    tmp: Path, base_url: str, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from persllm.config import load_project
    from persllm.index import run as build_index
    from persllm.index.encoder import embed

    config = write_project(tmp / "bench", base_url)
    project = load_project(config)
    build_index(project)
    embed(["warm up the encoder"], project.config.embedder)

    rows = []
    for concurrency in args.concurrency:
        result = annotate(config, args.items, concurrency, fresh=True)
        assert result["done"] == args.items and result["cached_calls"] == 0, result
        rows.append(
            {
                "concurrency": concurrency,
                "items": result["done"],
                "calls": result["calls"],
                "seconds": round(result["wall"], 3),
                "items_per_second": round(result["done"] / result["wall"], 3),
            }
        )
        if concurrency > 1:  # the HTTP client alone, same calls, no annotation work: the ceiling
            rows[-1]["client_only_items_per_second"] = round(
                client_ceiling(base_url, args.items, concurrency), 3
            )
        print(f"  concurrency {concurrency}: {rows[-1]['items_per_second']} items/s", flush=True)
    base = rows[0]["items_per_second"]
    for row in rows:
        row["speedup"] = round(row["items_per_second"] / base, 2)
        row["target_speedup"] = round(0.8 * row["concurrency"] / rows[0]["concurrency"], 1)
        row["meets_target"] = row["speedup"] >= row["target_speedup"] if row["concurrency"] <= 32 else None

    cold = annotate(config, args.warm_items, max(args.concurrency), fresh=True)
    shutil.rmtree(load_project(config).run_dir / "annotations")
    hot = annotate(config, args.warm_items, max(args.concurrency), fresh=False)
    skip = annotate(config, args.warm_items, max(args.concurrency), fresh=False)
    assert hot["done"] == args.warm_items and hot["cached_calls"] == hot["calls"] == cold["calls"], hot
    warm = {
        "items": args.warm_items,
        "cold_seconds": round(cold["wall"], 3),
        "warm_cache_seconds": round(hot["wall"], 3),
        "warm_cache_calls_to_server": hot["calls"] - hot["cached_calls"],
        "skip_rerun_seconds": round(skip["wall"], 3),
        "target_seconds": 3.0,
        "meets_target": hot["wall"] < 3.0,
    }
    return rows, warm


def report(rows: list[dict[str, Any]], warm: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nannotate throughput: {args.items} items, 2 calls each, "
        f"server latency {args.latency * 1000:.0f} ms"
    )
    print(
        f"{'concurrency':>11} {'items/s':>9} {'seconds':>9} {'speed-up':>9} {'target':>7} {'ok':>4} "
        f"{'client-only items/s':>20}"
    )
    for row in rows:
        ok = "-" if row["meets_target"] is None else ("yes" if row["meets_target"] else "no")
        ceiling = row.get("client_only_items_per_second")
        print(
            f"{row['concurrency']:>11} {row['items_per_second']:>9.2f} {row['seconds']:>9.2f} "
            f"{row['speedup']:>8.2f}x {row['target_speedup']:>6.1f}x {ok:>4} "
            f"{'-' if ceiling is None else f'{ceiling:.2f}':>20}"
        )
    print(
        f"\n{warm['items']} items: cold {warm['cold_seconds']:.2f} s; warm-cache re-annotation "
        f"{warm['warm_cache_seconds']:.2f} s ({warm['warm_cache_calls_to_server']} calls to the server; "
        f"target < 3 s: {'yes' if warm['meets_target'] else 'no'}); "
        f"re-run skipping all {warm['skip_rerun_seconds']:.2f} s"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch_threads": args.torch_threads,
    }
    payload = {"latency_s": args.latency, "rows": rows, "warm": warm, "machine": machine}
    OUT.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
