"""Local generation throughput: transformers against llama.cpp, one at a time and concurrently.

Evaluation and annotation send hundreds of calls; a local backend decodes concurrent calls together
(transformers: left-padded batches; llamacpp: llama.cpp's parallel slots). This times the same prompts
(a persona system prompt and 16 different questions, greedy, ``--new-tokens`` each) through each
backend's async ``generate`` with SmolLM2-135M-Instruct (``bundled:smollm2``: transformers runs its fp32
conversion, llama.cpp the Q4_1 GGUF file itself) on the CPU, at concurrency 1, 8 and 16, after one
warm-up call. No cache is used.

    .venv/bin/python benchmarks/generation.py [--prompts 16] [--new-tokens 48] [--concurrency 1,8,16]

Prints a table and writes benchmarks/out/generation.json. Tokens/s counts the tokens each reply really
has (a reply that ends early is not padded to ``--new-tokens``); ``speedup`` is llama.cpp over
transformers at the same concurrency.
"""

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out" / "generation.json"
SYSTEM = (
    "You are Elsie Wren, a lighthouse keeper's daughter from Carrow Bay: stubborn, precise and "
    "dry-humoured, trusting written records over talk. It is 1889, at the Skerrow Point lighthouse."
)
QUESTIONS = [
    "Who keeps the light at Skerrow Point?",
    "What do you write in the logbook every night?",
    "How many steps are there to the lamp room?",
    "What do you think of the fishermen at the Three Tuns?",
    "Is it true that the lamp burns whale oil?",
    "Tell me about your father.",
    "What would you change about the harbour?",
    "Do you ever get lonely up on the point?",
    "How do you know a storm is coming?",
    "What is the character of your light?",
    "Why do you distrust flattery?",
    "Could a woman be a harbour engineer?",
    "What happened to your mother?",
    "Which weather do you fear most?",
    "How do you clean the great lens?",
    "What advice would you give a new keeper?",
]


def conversations(n: int) -> list[list[dict[str, str]]]:
    questions = [
        QUESTIONS[i % len(QUESTIONS)] + (f" ({i // len(QUESTIONS)})" if i >= len(QUESTIONS) else "")
        for i in range(n)
    ]
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions]


BACKENDS = ("transformers", "llamacpp")


async def waves(
    backend: Any, prompts: list[list[dict[str, str]]], size: int, params: dict[str, Any]
) -> list[Any]:
    """The prompts in waves of ``size`` concurrent calls."""
    replies: list[Any] = []
    for start in range(0, len(prompts), size):
        wave = prompts[start : start + size]
        replies += await asyncio.gather(*(backend.generate(p, params) for p in wave))
    return replies


def measure(name: str, model: str, size: int, prompts: list[Any], params: dict[str, Any]) -> dict[str, Any]:
    from persllm.config.llm import LLMConfig
    from persllm.llm import make_backend

    cfg = LLMConfig.model_validate({"backend": name, "model": model, "device": "cpu", "concurrency": size})
    backend: Any = make_backend(cfg)  # no cache: every call really generates

    async def run() -> tuple[float, float, list[Any]]:
        began = time.perf_counter()
        await backend.generate(prompts[0], {**params, "max_tokens": 4})  # loads the model; warms up
        loaded = time.perf_counter() - began
        began = time.perf_counter()
        replies = await waves(backend, prompts, size, params)
        seconds = time.perf_counter() - began
        await backend.aclose()
        return loaded, seconds, replies

    loaded, seconds, replies = asyncio.run(run())
    tokens = sum(r.completion_tokens for r in replies)
    return {
        "backend": name,
        "concurrency": size,
        "prompts": len(replies),
        "new_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "load_seconds": round(loaded, 1),
        "texts": [r.text for r in replies],
    }


def agree(first: list[str], second: list[str], words: int | None = None) -> str:
    """How many replies are the same (or start with the same ``words`` words), as ``n/total``."""
    same = sum(
        (a.split()[:words] == b.split()[:words]) if words else a == b
        for a, b in zip(first, second, strict=True)
    )
    return f"{same}/{len(first)}"


def verdict(value: float, target: float) -> str:
    return f"{value:.2f}x ({'met' if value >= target else 'missed'}; target {target:g}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled:smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", default="1,8,16", help="comma-separated concurrency levels")
    args = parser.parse_args()

    import torch

    params = {"temperature": 0.0, "max_tokens": args.new_tokens}
    prompts = conversations(args.prompts)
    load_average = os.getloadavg()[0]
    levels = [int(level) for level in args.concurrency.split(",")]
    rows = [measure(name, args.model, size, prompts, params) for size in levels for name in BACKENDS]
    texts = {(m["backend"], m["concurrency"]): m.pop("texts") for m in rows}
    speedups = {}
    for size in levels:
        by = {m["backend"]: m for m in rows if m["concurrency"] == size}
        speedups[f"c{size}"] = round(by["llamacpp"]["tokens_per_s"] / by["transformers"]["tokens_per_s"], 2)
    best = {name: max(m["tokens_per_s"] for m in rows if m["backend"] == name) for name in BACKENDS}
    low, high = levels[0], levels[-1]
    single_speedup = speedups[f"c{low}"]
    best_speedup = round(best["llamacpp"] / best["transformers"], 2)
    same = {f"{name} c{low} vs c{high}": agree(texts[(name, low)], texts[(name, high)]) for name in BACKENDS}
    same[f"first 3 words, transformers vs llamacpp, c{low}"] = agree(
        texts[("transformers", low)], texts[("llamacpp", low)], words=3
    )
    single = {m["backend"]: m["tokens_per_s"] for m in rows if m["concurrency"] == low}
    result = {
        "rows": rows,
        "speedup": speedups,
        "targets": {
            "single_stream_4x": verdict(single_speedup, 4.0),
            "best_concurrent_2x": verdict(best_speedup, 2.0),
        },
        "same_text": same,
        "settings": {
            "model": args.model,
            "max_new_tokens": args.new_tokens,
            "greedy": True,
            "torch_threads": torch.get_num_threads(),
            "single_stream_tokens_per_s": single,
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_before": round(load_average, 2),
        },
    }

    print(f"{'backend':<14}{'conc':>5}{'prompts':>9}{'tokens':>8}{'seconds':>10}{'tok/s':>9}")
    for row in rows:
        print(
            f"{row['backend']:<14}{row['concurrency']:>5}{row['prompts']:>9}{row['new_tokens']:>8}"
            f"{row['seconds']:>10.2f}{row['tokens_per_s']:>9.1f}"
        )
    print("llama.cpp / transformers: " + ", ".join(f"{k} {v}x" for k, v in speedups.items()))
    for key, value in result["targets"].items():
        print(f"target {key}: {value}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
