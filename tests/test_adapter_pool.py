"""One base model, many persona adapters: each adapter answers in the pool exactly as it does alone.

The adapters are real PEFT LoRA folders (random, non-zero B so each one changes the model); one of them is
trained the ``new_tokens`` way (larger vocabulary, embeddings saved through ``modules_to_save``) and must be
kept out of the shared base.
"""

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from persllm.config.llm import LLMConfig
from persllm.errors import UserError
from persllm.llm.transformers_backend import TransformersBackend, reply_ids, saves_modules, shared_prefixes
from persllm.train.common import add_stage_tokens

PROMPTS = [
    [
        {"role": "system", "content": "You keep the light."},
        {"role": "user", "content": "<TIME-I> Who are you?"},
    ],
    [{"role": "user", "content": "<TIME-II> Is the sea kind?"}],
]
REPLIES = ["I keep the light at Skerrow Point.", "The sea does not forgive vanity."]


def make_adapter(base: str, out: Path, seed: int, new_tokens: bool = False, scale: float = 1.0) -> Path:
    """A LoRA adapter with random A and B (scaled by ``scale``), saved as persllm's training saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    extra: dict[str, Any] = {}
    if new_tokens:
        add_stage_tokens(model, tokenizer, ["<TIME-I>", "<TIME-II>"])
        extra = {"modules_to_save": ["embed_tokens", "lm_head"], "ensure_weight_tying": True}
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)
            if "modules_to_save" in name:  # the new tokens' rows, as training would have moved them
                parameter[-2:] += torch.randn_like(parameter[-2:])
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    folders = {f"plain{i}": make_adapter(str(tiny_model_dir), root / f"plain{i}", seed=i) for i in range(3)}
    folders["grown"] = make_adapter(str(tiny_model_dir), root / "grown", seed=9, new_tokens=True)
    return folders


def logits_of(backend: TransformersBackend, adapter: str | None) -> list[torch.Tensor]:
    return backend.reply_logits(PROMPTS, REPLIES, {"adapter": adapter})


def test_each_pooled_adapter_has_the_logits_it_has_alone(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    pool = TransformersBackend(LLMConfig(model=str(tiny_model_dir), device="cpu"))
    for name, folder in adapters.items():
        pool.add_adapter(name, folder)
    assert saves_modules(str(adapters["grown"])) and not saves_modules(str(adapters["plain0"]))
    # Interleaved, so every adapter is switched to after another one ran.
    order = ["plain1", "grown", "plain0", "plain2", "plain1", "base", "grown", "plain0"]
    pooled = {name: logits_of(pool, name) for name in order}
    seen: list[torch.Tensor] = []
    for name in dict.fromkeys(order):
        alone = TransformersBackend(
            LLMConfig(
                model=str(tiny_model_dir),
                device="cpu",
                adapter=None if name == "base" else str(adapters[name]),
            )
        )
        expected = logits_of(alone, None)
        for got, want in zip(pooled[name], expected, strict=True):
            width = min(got.shape[-1], want.shape[-1])  # the grown adapter has two more rows
            assert got.shape == want.shape
            assert (got[:, :width] - want[:, :width]).abs().max().item() < 1e-4, name
        seen.append(expected[0][:, : pooled["base"][0].shape[-1]])
    # Each adapter really changes the model: no two of them (or the base) give the same logits.
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert (seen[i] - seen[j]).abs().max().item() > 1e-2


def test_pooled_greedy_replies_equal_alone_and_batching_keeps_them(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    params = {"temperature": 0, "max_tokens": 12}
    pool = TransformersBackend(LLMConfig(model=str(tiny_model_dir), device="cpu", concurrency=2))
    for name, folder in adapters.items():
        pool.add_adapter(name, folder)
    for name, folder in adapters.items():
        alone = TransformersBackend(LLMConfig(model=str(tiny_model_dir), device="cpu", adapter=str(folder)))
        expected = [c.text for c in alone.generate_batch(PROMPTS, params)]
        assert [c.text for c in pool.generate_batch(PROMPTS, {**params, "adapter": name})] == expected


def test_an_adapter_of_another_base_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    adapter = make_adapter(str(tiny_model_dir), tmp_path / "adapter", seed=1)
    narrow = tmp_path / "narrow"
    config = LlamaConfig.from_pretrained(str(tiny_model_dir), hidden_size=32, intermediate_size=64)
    LlamaForCausalLM(config).save_pretrained(str(narrow))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, narrow / name)
    backend = TransformersBackend(LLMConfig(model=str(narrow), device="cpu"))
    backend.add_adapter("elsie", adapter)
    with pytest.raises(UserError, match=r"adapter 'elsie' .*: does not fit the base model .*narrow"):
        backend.load()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"peft_type": "IA3"}', r"peft_type is 'IA3', not 'LORA'; give a LoRA adapter folder"),
        ("{not json", r"adapter_config.json is not valid JSON"),
        ('{"peft_type": "LORA"}', r"has no adapter_model.safetensors"),
    ],
)
def test_a_folder_that_is_not_a_lora_adapter_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, content: str, message: str
) -> None:
    (tmp_path / "adapter_config.json").write_text(content)
    backend = TransformersBackend(LLMConfig(model=str(tiny_model_dir), device="cpu"))
    with pytest.raises(UserError, match=message):
        backend.add_adapter("elsie", tmp_path)


@pytest.mark.slow
def test_smollm2_pooled_greedy_replies_equal_alone(tmp_path: Path) -> None:
    from persllm.bundled import smollm2_folder

    base = str(smollm2_folder())
    folders = {f"p{i}": make_adapter(base, tmp_path / f"p{i}", seed=i, scale=0.05) for i in range(3)}
    params = {"temperature": 0, "max_tokens": 24}
    pool = TransformersBackend(LLMConfig(model="bundled:smollm2", device="cpu"))
    for name, folder in folders.items():
        pool.add_adapter(name, folder)
    replies = {}
    for name in ["p2", "p0", "p1"]:
        replies[name] = [c.text for c in pool.generate_batch(PROMPTS, {**params, "adapter": name})]
    for name, folder in folders.items():
        alone = TransformersBackend(LLMConfig(model="bundled:smollm2", device="cpu", adapter=str(folder)))
        assert [c.text for c in alone.generate_batch(PROMPTS, params)] == replies[name], name
        alone.release()
    base_replies = [c.text for c in pool.generate_batch(PROMPTS, {**params, "adapter": "base"})]
    assert len({tuple(r) for r in [*replies.values(), base_replies]}) >= 3  # the adapters change the replies


def test_shared_prompt_logprobs_equal_one_pass_per_row(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    """Candidates scored on one prompt's key/value cache equal each row run whole, adapter or not."""
    pool = TransformersBackend(LLMConfig(model=str(tiny_model_dir), device="cpu", concurrency=3))
    pool.add_adapter("plain0", adapters["plain0"])
    candidates = [*REPLIES, "A", "The keeper's log is full of fog, and the fog of names."]
    profile = "You are Elsie Wren, keeper of the Skerrow Point light, who writes short log entries."
    alike = [
        [{"role": "system", "content": profile}, {"role": "user", "content": question}]
        for question in ("<TIME-I> Who are you?", "<TIME-I> What did the sea do today?", "Why?")
    ]
    conversations = [PROMPTS[0]] * len(candidates) + [PROMPTS[1], *alike, alike[0]]
    replies = [*candidates, REPLIES[1], REPLIES[0], REPLIES[1], "Because.", "Fog."]
    for adapter in ("plain0", "base"):
        whole = pool.reply_logits(conversations, replies, {"adapter": adapter})
        tokenizer = pool.tokenizer
        expected = []
        for logits, reply in zip(whole, replies, strict=True):
            ids = torch.tensor(tokenizer(reply, add_special_tokens=False)["input_ids"])
            expected.append(torch.log_softmax(logits, dim=-1)[torch.arange(len(ids)), ids].tolist())
        shared = pool.reply_logprobs(conversations, replies, {"adapter": adapter})
        for got, want in zip(shared, expected, strict=True):
            assert len(got) == len(want) > 0
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
        cut = pool.reply_logprobs(conversations, replies, {"adapter": adapter}, max_reply_tokens=2)
        tokenized = [reply_ids(tokenizer, m, r)[0] for m, r in zip(conversations, replies, strict=True)]
        groups = shared_prefixes(tokenized)
        assert any(shared >= 16 and len(members) >= 4 for shared, members in groups)  # the profile, once
        assert [len(row) for row in cut] == [min(2, len(row)) for row in expected]
        assert all(c == pytest.approx(e[: len(c)], abs=1e-4) for c, e in zip(cut, expected, strict=True))
