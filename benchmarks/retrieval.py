"""Index and retrieval on real corpora: embedding throughput, query latency, and the reference's way.

Indexes the speeches under ``../shared/corpora`` (relative to the repository root: lincoln and roosevelt,
two stage folders each, read as style material) through a temporary project that points at them, then
times 200 seeded retrievals (queries are sentences sampled from the corpus, the chunk they came from is
the seed) with one warm ``Retriever``, against the same queries done the way the reference code does
them: a new SentenceTransformer for every query.

    .venv/bin/python benchmarks/retrieval.py [--queries 200] [--reference-queries 200]

Prints a table and writes benchmarks/out/retrieval.json. Skips (exit 0) when the corpora are absent.
"""

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from persllm.config import Project
from persllm.index.retrieve import Context, Pool, Retriever, fill, load_stage, piece_of
from persllm.persona.corpus import Chunk, split_sentences

Query = tuple[str, str, str, Chunk]
REPO = Path(__file__).resolve().parent.parent
CORPORA = REPO.parent / "shared" / "corpora"
OUT = Path(__file__).resolve().parent / "out" / "retrieval.json"


def write_project(root: Path, corpora: Path) -> Path:
    """A project whose personas' stages are the corpus folders (absolute globs: nothing is copied)."""
    (root / "personas").mkdir(parents=True)
    names = []
    for persona in sorted(p for p in corpora.iterdir() if p.is_dir()):
        stages = sorted(s for s in persona.iterdir() if s.is_dir())
        lines = [f"id: {persona.name}", f"name: {persona.name.title()}", "stages:"]
        for stage in stages:
            lines += [
                f"  - id: '{stage.name}'",
                f"    time: 'It is {stage.name}.'",
                f"    style: ['{stage}/*.txt']",
            ]
        (root / "personas" / f"{persona.name}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        names.append(persona.name)
    config = root / "persllm.yaml"
    config.write_text(
        f"project: bench\nrun_dir: {root / 'run'}\npersonas: ['personas/*.yaml']\n", encoding="utf-8"
    )
    return config


def sample_queries(retriever: Retriever, project: Project, count: int, seed: int) -> list[Query]:
    """``count`` (persona, stage, sentence, seed chunk) tuples, drawn reproducibly from the corpus."""
    rng = random.Random(seed)
    pool = [
        chunk
        for persona in project.personas.values()
        for stage in persona.stages
        for chunk in retriever.chunks(persona.id, stage.id)
        if chunk.words >= 12
    ]
    queries = []
    for chunk in rng.sample(pool, count):
        sentences = [s for s in split_sentences(chunk.text) if len(s.split()) >= 5] or [chunk.text]
        queries.append((chunk.persona, chunk.stage, rng.choice(sentences), chunk))
    return queries


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def style_pool(project: Project, persona: str, stage: str) -> Pool:
    chunks, matrix = load_stage(project, persona, stage)
    rows = [i for i, chunk in enumerate(chunks) if chunk.kind == "style"]
    return Pool([chunks[i] for i in rows], matrix[rows], np.array([chunks[i].words for i in rows]))


def timed_retrievals(retriever: Retriever, queries: list[Query]) -> tuple[list[float], list[Context]]:
    """Milliseconds of each ``retriever.retrieve`` call, and the contexts it returned."""
    latencies, contexts = [], []
    for persona, stage, text, seed in queries:
        began = time.perf_counter()
        contexts.append(retriever.retrieve(persona, stage, text, seed=seed))
        latencies.append((time.perf_counter() - began) * 1000)
    return latencies, contexts


def breakdown(
    retriever: Retriever, project: Project, queries: list[Query]
) -> tuple[list[float], list[float]]:
    """Per query: milliseconds to encode it alone, and to score and fill both contexts (no encoder)."""
    from persllm.index import encoder

    cfg = project.config
    encode_ms, select_ms = [], []
    for persona, stage, text, seed in queries:
        began = time.perf_counter()
        vector = encoder.embed([text], cfg.embedder)[0]
        middle = time.perf_counter()
        pools = retriever.pools(persona, stage)
        budgets = {"knowledge": cfg.retrieval.knowledge_words, "style": cfg.retrieval.style_words}
        for kind, pool in pools.items():
            first = piece_of(seed, 1.0) if seed.kind == kind else None
            fill(pool, vector, budgets[kind], first)
        ended = time.perf_counter()
        encode_ms.append((middle - began) * 1000)
        select_ms.append((ended - middle) * 1000)
    return encode_ms, select_ms


def reference_way(project: Project, queries: list[Query]) -> tuple[list[float], list[list[str]]]:
    """Each query: a fresh SentenceTransformer, encode, score against the stage, fill the same budget.

    Only the encoder handling differs from persllm: the stored vectors are loaded once up front.
    """
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from persllm.bundled import resolve_model

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per query would flood the table
    cfg = project.config
    location = resolve_model(cfg.embedder.model)
    pools = {(p, s): style_pool(project, p, s) for p, s, _, _ in queries}
    latencies, results = [], []
    for persona, stage, text, seed in queries:
        started = time.perf_counter()
        model = SentenceTransformer(location, device=cfg.embedder.device)
        vector = np.asarray(model.encode([text], normalize_embeddings=True)[0], dtype=np.float32)
        style = fill(pools[persona, stage], vector, cfg.retrieval.style_words, piece_of(seed, 1.0))
        latencies.append((time.perf_counter() - started) * 1000)
        results.append([piece.id for piece in style])
    return latencies, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--reference-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not CORPORA.is_dir():
        print(f"skipped: {CORPORA} not found (the shared corpora sit beside the repository)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from persllm import index
    from persllm.config import load_project
    from persllm.index import encoder

    with tempfile.TemporaryDirectory(prefix="persllm-bench-") as tmp:
        project = load_project(write_project(Path(tmp), CORPORA))

        # Load the encoder, then index cold (everything embedded) and warm (nothing embedded).
        started = time.perf_counter()
        encoder.get_encoder(project.config.embedder)
        load_seconds = time.perf_counter() - started
        cold = index.run(project)
        warm = index.run(project)

        # 200 seeded retrievals with one warm Retriever (stage indexes loaded by a first query each).
        retriever = Retriever(project)
        queries = sample_queries(retriever, project, args.queries, args.seed)
        for persona, stage, text, seed in queries:
            retriever.retrieve(persona, stage, text, seed=seed)
        # Time new queries: the query-vector cache would otherwise answer every one of them.
        encoder.clear_query_cache()
        latencies, contexts = timed_retrievals(retriever, queries)
        ours = [[piece.id for piece in context.style] for context in contexts]
        repeated, _ = timed_retrievals(retriever, queries)  # now every query vector is cached
        encode_ms, select_ms = breakdown(retriever, project, queries)

        # The same queries the reference's way (a new encoder per query).
        subset = queries[: args.reference_queries]
        ref_latencies, ref_results = reference_way(project, subset)

    same = sum(a == b for a, b in zip(ours, ref_results, strict=False))
    result = {
        "corpus": {
            "path": str(CORPORA),
            "stages": cold["stages"],
            "chunks": cold["chunks"],
            "words_per_chunk_max": project.config.corpus.max_words,
        },
        "index": {
            "encoder_load_seconds": round(load_seconds, 2),
            "cold_seconds": cold["seconds"],
            "cold_embedded": cold["embedded"],
            "chunks_per_second": round(cold["embedded"] / cold["seconds"], 1),
            "warm_seconds": warm["seconds"],
            "warm_embedded": warm["embedded"],
        },
        "retrieval": {
            "queries": len(latencies),
            "persllm_p50_ms": round(percentile(latencies, 50), 2),
            "persllm_p95_ms": round(percentile(latencies, 95), 2),
            "persllm_mean_ms": round(statistics.fmean(latencies), 2),
            "repeated_query_p50_ms": round(percentile(repeated, 50), 3),
            "encode_query_p50_ms": round(percentile(encode_ms, 50), 2),
            "score_and_select_p50_ms": round(percentile(select_ms, 50), 3),
            "score_and_select_p95_ms": round(percentile(select_ms, 95), 3),
            "reference_queries": len(ref_latencies),
            "reference_p50_ms": round(percentile(ref_latencies, 50), 1),
            "reference_p95_ms": round(percentile(ref_latencies, 95), 1),
            "speedup_p50": round(percentile(ref_latencies, 50) / percentile(latencies, 50), 1),
            "same_style_context": f"{same}/{len(ref_results)}",
            "target_p50_ms": 30,
        },
        "machine": {
            "python": sys.version.split()[0],
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
    }
    print_tables(result)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


def print_tables(result: dict) -> None:
    print(f"{'persona':<12}{'stage':<12}{'chunks':>8}{'embedded':>10}")
    for row in result["corpus"]["stages"]:
        print(f"{row['persona']:<12}{row['stage']:<12}{row['chunks']:>8}{row['embedded']:>10}")
    ix, rt = result["index"], result["retrieval"]
    print(
        f"\nindex: {ix['cold_embedded']} chunks embedded in {ix['cold_seconds']:.1f} s "
        f"({ix['chunks_per_second']} chunks/s, encoder load {ix['encoder_load_seconds']} s); "
        f"re-index {ix['warm_seconds']:.2f} s, {ix['warm_embedded']} embedded"
    )
    print(f"\n{'retrieval':<34}{'queries':>8}{'p50 ms':>10}{'p95 ms':>10}")
    print(
        f"{'persllm (encoder loaded once)':<34}{rt['queries']:>8}"
        f"{rt['persllm_p50_ms']:>10.1f}{rt['persllm_p95_ms']:>10.1f}"
    )
    print(f"{'persllm, repeated query (cached)':<34}{rt['queries']:>8}{rt['repeated_query_p50_ms']:>10.2f}")
    print(
        f"{'reference (encoder per query)':<34}{rt['reference_queries']:>8}"
        f"{rt['reference_p50_ms']:>10.1f}{rt['reference_p95_ms']:>10.1f}"
    )
    print(
        f"of which: encoding the query p50 {rt['encode_query_p50_ms']:.1f} ms; scoring + selection "
        f"p50 {rt['score_and_select_p50_ms']:.2f} ms, p95 {rt['score_and_select_p95_ms']:.2f} ms"
    )
    print(
        f"speedup at p50: {rt['speedup_p50']}x; same style context: {rt['same_style_context']}; "
        f"target p50 < {rt['target_p50_ms']} ms; load average {result['machine']['load_average_1m']} "
        f"on {result['machine']['cores']} cores"
    )


if __name__ == "__main__":
    raise SystemExit(main())
