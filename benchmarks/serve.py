"""Benchmark of `persllm serve` on the tiny model: throughput, latency and the cost of switching adapters.

Builds a tiny Llama (tests/tiny.py) with three persona LoRA adapters, serves it with uvicorn on
127.0.0.1 and sends short chats over HTTP:

- 64 concurrent chats on one adapter, spread over three adapters, on the base model, and streamed;
- streamed chats one at a time (a lone stream's latency, against which the concurrent streams compare);
- sequential chats on one adapter vs alternating between two (the per-request cost of switching).

Prints a table and writes benchmarks/out/serve.json. Run: .venv/bin/python benchmarks/serve.py
(``--streaming-only`` runs just the two streamed scenarios).
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from tests.test_chat_project import build_project  # noqa: E402
from tests.tiny import build_tiny_model  # noqa: E402

from persllm.config import load_project  # noqa: E402
from persllm.interact.serve import create_app  # noqa: E402

ADAPTERS = ["elsie:keeper:sft", "jonah:mayor:sft", "elsie:keeper:dpo"]
QUESTIONS = ["Who keeps the light?", "Is the sea kind?", "What do you teach?", "What burns in the lamp?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def one_chat(client: httpx.AsyncClient, model: str, index: int, max_tokens: int, stream: bool) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    started = time.perf_counter()
    if stream:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for _ in response.aiter_lines():
                pass
    else:
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
    return time.perf_counter() - started


async def concurrent(url: str, models: list[str], max_tokens: int, stream: bool = False) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=len(models), max_keepalive_connections=len(models))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        latencies = await asyncio.gather(
            *(one_chat(client, model, i, max_tokens, stream) for i, model in enumerate(models))
        )
        wall = time.perf_counter() - started
    return summary(list(latencies), wall)


async def sequential(
    url: str, models: list[str], max_tokens: int, stream: bool = False
) -> tuple[list[float], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_chat(client, models[0], 0, max_tokens, stream)  # warm up
        started = time.perf_counter()
        latencies = [await one_chat(client, model, i, max_tokens, stream) for i, model in enumerate(models)]
        return latencies, time.perf_counter() - started


def merge(runs: list[tuple[list[float], float]]) -> dict[str, Any]:
    return summary([x for latencies, _ in runs for x in latencies], sum(wall for _, wall in runs))


def summary(latencies: list[float], wall: float) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="Concurrent chats per scenario.")
    parser.add_argument("--sequential", type=int, default=24, help="Chats in each sequential switching run.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of the two sequential runs.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--batch", type=int, default=8, help="base_model.concurrency: rows per generate batch."
    )
    parser.add_argument(
        "--streaming-only", action="store_true", help="Run only the lone and concurrent streamed scenarios."
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # setup: tiny model, three adapters, the server in a thread
        root = Path(tmp)
        base = build_tiny_model(root / "tiny")
        config = build_project(root / "project", base, variants=("sft", "dpo"))
        project = load_project(config, {"base_model.concurrency": args.batch})
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(project), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"

        # scenarios
        n, tokens = args.requests, args.max_tokens
        results: dict[str, dict[str, Any]] = {}
        m = args.sequential
        asyncio.run(concurrent(url, ADAPTERS * 2, tokens))  # warm up every adapter
        if not args.streaming_only:
            results["concurrent, one adapter"] = asyncio.run(concurrent(url, [ADAPTERS[0]] * n, tokens))
            results["concurrent, 3 adapters mixed"] = asyncio.run(
                concurrent(url, [ADAPTERS[i % 3] for i in range(n)], tokens)
            )
            results["concurrent, base model"] = asyncio.run(concurrent(url, ["base"] * n, tokens))
        results["streamed, one at a time"] = merge(
            [asyncio.run(sequential(url, [ADAPTERS[0]] * m, tokens, True))]
        )
        results["concurrent, streamed, one adapter"] = asyncio.run(
            concurrent(url, [ADAPTERS[0]] * n, tokens, True)
        )
        if not args.streaming_only:
            # switching: rounds of (same, alternating) so load on a shared machine hits both alike
            same_runs, alternating_runs = [], []
            for _ in range(args.rounds):
                same_runs.append(asyncio.run(sequential(url, [ADAPTERS[0]] * m, tokens)))
                alternating_runs.append(
                    asyncio.run(sequential(url, [ADAPTERS[i % 2] for i in range(m)], tokens))
                )
            results["sequential, same adapter"] = merge(same_runs)
            results["sequential, alternating 2 adapters"] = merge(alternating_runs)
        server.should_exit = True
        thread.join(timeout=10)

    lone_stream = results["streamed, one at a time"]["p50_ms"]
    report = {
        "benchmark": "serve",
        "model": "tests/tiny.py Llama (hidden 64, 2 layers), LoRA r=4 on q/v/o",
        "max_tokens": tokens,
        "requests": n,
        "batch": args.batch,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "scenarios": results,
        "concurrent_streamed_p50_over_lone": round(
            results["concurrent, streamed, one adapter"]["p50_ms"] / lone_stream, 2
        ),
    }
    if "sequential, same adapter" in results:
        same = results["sequential, same adapter"]["p50_ms"]
        alternating = results["sequential, alternating 2 adapters"]["p50_ms"]
        report["switch_cost_ms_per_request"] = round(alternating - same, 1)
    out = REPO / "benchmarks" / "out" / "serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"{'scenario':38} {'requests':>8} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9}")
    for name, row in results.items():
        print(
            f"{name:38} {row['requests']:>8} {row['requests_per_s']:>8} {row['p50_ms']:>9} {row['p95_ms']:>9}"
        )
    ratio = report["concurrent_streamed_p50_over_lone"]
    print(f"{n} concurrent streams: p50 latency {ratio}x a lone stream's")
    if "switch_cost_ms_per_request" in report:
        cost = report["switch_cost_ms_per_request"]
        print(f"adapter switch cost: {cost} ms per request (median latency, alternating - same)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
