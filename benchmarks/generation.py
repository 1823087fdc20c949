"""Local generation throughput: batched against one-by-one, through persllm's transformers backend.

Evaluation answers hundreds of held-out questions per system; the backend's ``generate_batch`` left-pads
similar-length prompts into batches. This times the same prompts (a persona system prompt and 16
different questions, greedy, ``--new-tokens`` each) generated one at a time and in one batch, with
SmolLM2-135M-Instruct (``bundled:smollm2``) on the CPU, after one warm-up call. No cache is used.

    .venv/bin/python benchmarks/generation.py [--prompts 16] [--new-tokens 48] [--batch 16] [--threads N]

Prints a table and writes benchmarks/out/generation.json. Tokens/s counts the tokens each reply really
has (a reply that ends early is not padded to ``--new-tokens``).
"""

import argparse
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


def timed(
    backend: Any, batches: list[list[list[dict[str, str]]]], params: dict[str, Any]
) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    replies = [reply for batch in batches for reply in backend.generate_batch(batch, params)]
    return time.perf_counter() - started, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled:smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from persllm.llm import make_backend
    from persllm.llm.config import LLMConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LLMConfig.model_validate(
        {"backend": "transformers", "model": args.model, "device": "cpu", "concurrency": args.batch}
    )
    backend: Any = make_backend(cfg)  # no cache: every call really generates
    params = {"temperature": 0.0, "max_tokens": args.new_tokens}
    prompts = conversations(args.prompts)
    load_average = os.getloadavg()[0]

    started = time.perf_counter()
    backend.generate_batch(prompts[:1], {**params, "max_tokens": 4})  # loads the model; warms up
    load_seconds = time.perf_counter() - started
    sequential_s, one_by_one = timed(backend, [[p] for p in prompts], params)
    batched_s, together = timed(backend, [prompts], params)

    rows = []
    for mode, seconds, replies, size in (
        ("sequential", sequential_s, one_by_one, 1),
        ("batched", batched_s, together, min(args.batch, args.prompts)),
    ):
        tokens = sum(r.completion_tokens for r in replies)
        rows.append(
            {
                "mode": mode,
                "batch_size": size,
                "prompts": len(replies),
                "new_tokens": tokens,
                "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
            }
        )
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    same = sum(a.text == b.text for a, b in zip(one_by_one, together, strict=True))
    result = {
        "rows": rows,
        "speedup": round(speedup, 2),
        "same_text": f"{same}/{len(prompts)}",
        "settings": {
            "model": args.model,
            "max_new_tokens": args.new_tokens,
            "greedy": True,
            "torch_threads": torch.get_num_threads(),
            "model_load_seconds": round(load_seconds, 1),
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_before": round(load_average, 2),
        },
    }

    print(f"{'mode':<12}{'batch':>6}{'prompts':>9}{'tokens':>8}{'seconds':>10}{'tok/s':>9}")
    for row in rows:
        print(
            f"{row['mode']:<12}{row['batch_size']:>6}{row['prompts']:>9}{row['new_tokens']:>8}"
            f"{row['seconds']:>10.2f}{row['tokens_per_s']:>9.1f}"
        )
    print(
        f"speedup {speedup:.2f}x; identical greedy replies {same}/{len(prompts)} "
        "(left padding shifts the numerics a little)"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
