"""A tiny real Llama (hidden 64, 2 layers) with a BPE tokenizer trained on the fly, for fast tests.

It is a real transformers model saved to a real folder, so every code path that loads, trains,
adapts or generates runs as it would with a big model, in seconds on a CPU.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# ChatML with {% generation %} markers so TRL's assistant_only_loss works.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

SAMPLE_TEXT = [
    "The lighthouse keeper wrote the weather in her logbook every night.",
    "The schoolmaster taught the children to read and to count.",
    "Storms came from the north and broke the old harbour wall.",
    "A steam trawler passed the point at dawn, and the lamp was trimmed.",
    "I keep the light. The sea does not forgive vanity.",
    "Patience is the mother of learning, as the old proverb says.",
    "<think> The user asks about the lamp. </think> The lamp burns oil.",
    "user assistant system hello who are you what do you think",
]


def train_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: Path, texts: list[str] | None = None, seed: int = 0, architecture: str = "llama"
) -> Path:
    """Write a tiny randomly initialised Llama (or, ``architecture="qwen2"``, Qwen2) and its tokenizer."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer((texts or []) + SAMPLE_TEXT * 4)
    config_class, model_class = (
        (Qwen2Config, Qwen2ForCausalLM) if architecture == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pretrain_tiny_model(path: Path, dialogues: list[list[dict[str, str]]], steps: int = 150) -> Path:
    """Fully fine-tune the tiny model on chat ``dialogues`` so it produces their kind of text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = [tokenizer.apply_chat_template(d, tokenize=False) for d in dialogues]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return path
