"""Two persona adapters served by vLLM from one base (``--enable-lora``) answer as they do in transformers.

Needs a CUDA GPU and ``pip install vllm``; marked ``gpu`` (never in the default run) and skipped without
either. Run it with ``pytest -m gpu tests/test_vllm_gpu.py``.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = [
    [
        {"role": "system", "content": "You are Elsie Wren."},
        {"role": "user", "content": "<TIME-I> Who are you?"},
    ],
    [{"role": "user", "content": "<TIME-II> What do you make of the new breakwater?"}],
]


def have_gpu_and_vllm() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not have_gpu_and_vllm(), reason="needs a CUDA GPU and vllm installed")
def test_vllm_serves_two_persona_adapters_like_transformers(tmp_path: Path) -> None:
    import httpx

    from persllm.bundled import smollm2_folder
    from persllm.llm import LLMConfig, TransformersBackend
    from persllm.train.vllm_check import vllm_problems
    from tests.test_adapter_pool import make_adapter

    base = str(smollm2_folder())
    adapters = {f"p{i}": make_adapter(base, tmp_path / f"p{i}", seed=i, scale=0.05) for i in range(2)}
    assert all(vllm_problems(folder) == [] for folder in adapters.values())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    modules = [f"{name}={folder}" for name, folder in adapters.items()]
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        base,
        "--dtype",
        "float32",
    ]
    command += ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", *modules, "--port", str(port)]
    command += ["--max-model-len", "1024", "--gpu-memory-utilization", "0.5", "--enforce-eager"]
    server = subprocess.Popen(command, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, "vllm exited"
            assert time.monotonic() < deadline, "vllm did not start"
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        reference = TransformersBackend(
            LLMConfig(
                model="bundled:smollm2",
                device="cuda",
                dtype="float32",
                params={"temperature": 0, "max_tokens": 16},
            )
        )
        for name, folder in adapters.items():
            reference.add_adapter(name, folder)
        replies = {}
        for name in adapters:
            expected = [c.text for c in reference.generate_batch(PROMPTS, {"adapter": name})]
            got = []
            for messages in PROMPTS:
                body = {"model": name, "messages": messages, "temperature": 0, "max_tokens": 16}
                response = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
                got.append(response["choices"][0]["message"]["content"])
            # Two engines on one GPU: the same first words; kernels may part ways late in a reply.
            assert [g.split()[:4] for g in got] == [e.split()[:4] for e in expected], name
            replies[name] = tuple(got)
        assert replies["p0"] != replies["p1"]
    finally:
        server.terminate()
        server.wait(timeout=60)
