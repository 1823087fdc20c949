"""Annotation throughput against a scripted OpenAI-compatible server with 200 ms per request.

A tiny one-persona project (real MiniLM index) is annotated with ``output: json`` and no follow-ups,
so every item is annotator-written: two calls (user input, then the reply) with a retrieval between
them (the user input embedded as the query of the reply's knowledge and style context). The server
runs in its own process.

1. 256 items at concurrency 8, 32 and 64, and 1,024 at 64 (closer to a steady state: 16 items a slot
   instead of 4), in the same run and against the same server, ``--repeats`` times interleaved
   (medians reported):
   - ceiling: a minimal raw-HTTP client (asyncio streams, one keep-alive connection per worker, no
     parsing beyond the headers) making the same requests (two per item) as many at a time;
   - client only: the same calls through ``OpenAIBackend`` alone (no retrieval, cache or files);
   - annotate: ``persllm annotate`` of the items from a fresh cache.
   Target: annotation at >= 70% of the ceiling's requests/s at concurrency 64 (256 items).
2. 1,000 items annotated once, the annotations deleted, then re-annotated from the warm SQLite
   cache (target < 3 s, zero calls reaching the server); and a plain re-run that skips them all.

    .venv/bin/python benchmarks/annotate_throughput.py [--items 256] [--steady-items 1024] [--repeats 3]

Prints a table and writes ``benchmarks/out/annotate_throughput.json`` (with the load average around
each row: the annotator's retrieval is CPU work, so other load on the machine lowers its share).
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
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
TARGET_SHARE = 0.7

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
    """``persllm annotate`` of ``items`` items; adds the wall time and the retrieval queue's counters."""
    from persllm.annotate import engine, run
    from persllm.config import load_project
    from persllm.index.encoder import clear_query_cache

    queues: list[Any] = []

    class Recorded(engine.RetrievalQueue):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            queues.append(self)

    project = load_project(config, {"annotate.counts": counts_for(items)})
    if fresh:
        shutil.rmtree(project.layout.annotations, ignore_errors=True)
        for path in project.run_dir.glob("cache.sqlite*"):
            path.unlink()
        clear_query_cache()  # time the encoder, not the query cache
    original = engine.RetrievalQueue
    setattr(engine, "RetrievalQueue", Recorded)  # noqa: B010 (counts the queue's batches)
    try:
        started = time.perf_counter()
        result = run(project, concurrency=concurrency, progress=False)
        result["wall"] = time.perf_counter() - started
    finally:
        setattr(engine, "RetrievalQueue", original)  # noqa: B010
    # getattr: the benchmark also runs against older versions of the queue (before/after comparisons).
    queue = queues[0] if queues else None
    result["retrieval"] = {
        "workers": getattr(queue, "workers", 1),
        "batches": getattr(queue, "batches", 0),
        "queries": getattr(queue, "queries", items),
        "most_at_once": getattr(queue, "most_at_once", 1),
        "busy_seconds": getattr(queue, "busy_seconds", 0.0),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument(
        "--steady-items",
        type=int,
        default=1024,
        help="Items of an extra row at the top concurrency (0: none).",
    )
    parser.add_argument("--warm-items", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved measurements per row (median).")
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
            rows, warm = run_benchmark(Path(tmp), port, args)
    finally:
        server.terminate()
        server.wait(timeout=10)
    report(rows, warm, args)


def raw_bodies() -> list[bytes]:
    """The ceiling's two requests, shaped like an item's: a user-input prompt, a JSON-schema reply prompt."""
    context = " ".join(paragraph for paragraphs in CORPUS.values() for paragraph in paragraphs)
    user = {"role": "user", "content": f"Write the question a visitor asks Ada Thorne. {context}"}
    ask = {"model": "fake", "messages": [user], "temperature": 0.7, "max_tokens": 200}
    schema = {"type": "json_schema", "json_schema": {"name": "reply", "schema": {"type": "object"}}}
    return [json.dumps(ask).encode(), json.dumps({**ask, "response_format": schema}).encode()]


def raw_ceiling(port: int, requests: int, concurrency: int) -> float:
    """Requests/s of a minimal HTTP/1.1 client: ``concurrency`` keep-alive connections, nothing else."""
    bodies = raw_bodies()
    heads = [
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    left = [requests]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            writer.write(heads[left[0] % 2])
            status = await reader.readline()
            assert status.split()[1] == b"200", status
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
        writer.close()
        await writer.wait_closed()

    async def go() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)

    return asyncio.run(go())


def client_only(base_url: str, requests: int, concurrency: int) -> float:
    """Requests/s of bare ``OpenAIBackend`` calls: no retrieval, cache or files."""
    from persllm.config.llm import LLMConfig
    from persllm.llm.openai_backend import OpenAIBackend

    async def go() -> float:
        cfg = LLMConfig(backend="openai", base_url=base_url, model="fake", concurrency=concurrency)
        backend = OpenAIBackend(cfg)
        messages = [{"role": "user", "content": "How often did the Heron cross in winter?"}]
        started = time.perf_counter()
        await asyncio.gather(*(backend.generate(messages, {"max_tokens": 50}) for _ in range(requests)))
        seconds = time.perf_counter() - started
        await backend.aclose()
        return requests / seconds

    return asyncio.run(go())


def measure_row(
    config: Path, port: int, concurrency: int, items: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One concurrency: ceiling, client only and annotation, interleaved ``args.repeats`` times."""
    base_url = f"http://127.0.0.1:{port}/v1"
    requests = 2 * items
    ceiling, client, annotated, runs, loads = [], [], [], [], []
    for _ in range(args.repeats):
        loads.append(os.getloadavg()[0])
        ceiling.append(raw_ceiling(port, requests, concurrency))
        client.append(client_only(base_url, requests, concurrency))
        result = annotate(config, items, concurrency, fresh=True)
        assert result["done"] == items and result["cached_calls"] == 0, result
        assert result["sources"] == {"annotator": items} and result["calls"] == requests, result
        runs.append(result)
        annotated.append(result["calls"] / result["wall"])
    loads.append(os.getloadavg()[0])
    median = statistics.median(annotated)
    run = runs[annotated.index(min(annotated, key=lambda value: abs(value - median)))]
    ceiling_rps = statistics.median(ceiling)
    retrieval = run["retrieval"]
    return {
        "concurrency": concurrency,
        "items": items,
        "calls": run["calls"],
        "latency_bound_rps": round(concurrency / args.latency, 1),
        "ceiling_rps": round(ceiling_rps, 1),
        "client_only_rps": round(statistics.median(client), 1),
        "annotate_rps": round(median, 1),
        "annotate_items_per_second": round(median / 2, 2),
        "share_of_ceiling": round(median / ceiling_rps, 3),
        "annotate_rps_runs": "/".join(f"{value:.0f}" for value in annotated),
        "retrieval_workers": retrieval["workers"],
        "retrieval_batch_mean": round(retrieval["queries"] / max(1, retrieval["batches"]), 1),
        "retrieval_most_at_once": retrieval["most_at_once"],
        "retrieval_busy_share": round(retrieval["busy_seconds"] / run["wall"], 2),
        "load_average": f"{min(loads):.2f}-{max(loads):.2f}",
        "meets_target": median >= TARGET_SHARE * ceiling_rps
        if (concurrency, items) == (64, args.items)
        else None,
    }


def run_benchmark(
    tmp: Path, port: int, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from persllm.config import load_project
    from persllm.index import run as build_index
    from persllm.index.encoder import embed

    config = write_project(tmp / "bench", f"http://127.0.0.1:{port}/v1")
    project = load_project(config)
    build_index(project)
    embed(["warm up the encoder"], project.config.embedder)
    raw_ceiling(port, 64, 8)  # warm up the server's threads and the loopback

    rows = []
    runs = [(concurrency, args.items) for concurrency in args.concurrency]
    if args.steady_items:  # the top concurrency again, long enough for the start and end to matter less
        runs.append((max(args.concurrency), args.steady_items))
    for concurrency, items in runs:
        rows.append(measure_row(config, port, concurrency, items, args))
        row = rows[-1]
        print(
            f"  concurrency {concurrency}, {items} items: annotate {row['annotate_rps']} requests/s, "
            f"ceiling {row['ceiling_rps']} ({row['share_of_ceiling']:.0%}); load {row['load_average']}",
            flush=True,
        )

    top = max(args.concurrency)
    cold = annotate(config, args.warm_items, top, fresh=True)
    shutil.rmtree(load_project(config).layout.annotations)
    hot = annotate(config, args.warm_items, top, fresh=False)
    skip = annotate(config, args.warm_items, top, fresh=False)
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
        "\nannotate throughput: annotator-written items (2 calls + 1 retrieval each), "
        f"server latency {args.latency * 1000:.0f} ms, median of {args.repeats}"
    )
    print(
        f"{'concurrency':>11} {'items':>6} {'items/s':>8} {'req/s':>7} {'ceiling req/s':>14} {'share':>6} "
        f"{'client-only req/s':>18} {'bound':>6} {'load':>10} {'ok':>4}"
    )
    for row in rows:
        ok = "-" if row["meets_target"] is None else ("yes" if row["meets_target"] else "no")
        print(
            f"{row['concurrency']:>11} {row['items']:>6} {row['annotate_items_per_second']:>8.1f} "
            f"{row['annotate_rps']:>7.1f} "
            f"{row['ceiling_rps']:>14.1f} {row['share_of_ceiling']:>6.0%} {row['client_only_rps']:>18.1f} "
            f"{row['latency_bound_rps']:>6.0f} {row['load_average']:>10} {ok:>4}"
        )
    print(f"target: annotation >= {TARGET_SHARE:.0%} of the ceiling at concurrency 64 ({args.items} items)")
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
    payload = {
        "latency_s": args.latency,
        "repeats": args.repeats,
        "target_share_at_64": TARGET_SHARE,
        "rows": rows,
        "warm": warm,
        "machine": machine,
    }
    OUT.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
