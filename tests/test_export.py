"""``persllm export``: merged weights that reload with plain transformers and generate like the adapter."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from persllm.cli import app
from persllm.config import Project, load_project
from persllm.errors import UserError
from persllm.train import dpo, export, sft
from tests.test_train import ANSWERS, DPO_TRL, QUESTIONS, SFT_TRL, dialogue, make_project


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A short SFT then a short DPO: enough to move every trained weight away from the base."""
    root = tmp_path_factory.mktemp("exportproj")
    base = shutil.copytree(tiny_model_dir, root / "base")
    config = make_project(root, base, {**SFT_TRL, "max_steps": 8}, {**DPO_TRL, "max_steps": 2})
    loaded = load_project(config)
    sft.run(loaded, "elsie")
    dpo.run(loaded, "elsie")
    return loaded


def prompt_ids(tokenizer: Any, label: str) -> Any:
    return tokenizer.apply_chat_template(
        dialogue(label, QUESTIONS[0]), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_cli_export_reloads_with_plain_transformers(project: Project, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "elsie-dpo"
    result = CliRunner().invoke(
        app, ["export", str(project.config_path), "--persona", "elsie", "--merge", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "elsie: dpo merged" in result.output and "<TIME-II>=" in result.output
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    adapter_model, adapter_tokenizer = export.load_trained(project, "elsie", "dpo")
    assert tokenizer.chat_template == adapter_tokenizer.chat_template
    marker = json.loads((out / export.MARKER).read_text())
    for label in ANSWERS:
        assert tokenizer.convert_tokens_to_ids(label) == marker["stage_tokens"][label]
        batch = prompt_ids(tokenizer, label)
        with torch.no_grad():
            expected = adapter_model(**batch).logits
            got = merged(**batch).logits
            assert torch.allclose(got, expected, atol=1e-4)
            generated = merged.generate(**batch, max_new_tokens=12, do_sample=False)
        assert generated.shape[1] > batch["input_ids"].shape[1]
    # The tied input/output embeddings stay one matrix in the exported model.
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


def test_export_sft_differs_from_base_and_replaces_earlier_export(project: Project, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "elsie-sft"
    first = export.run(project, "elsie", out, variant="sft")
    assert first["variant"] == "sft" and first["training"]["stage"] == "sft"
    export.run(project, "elsie", out, variant="sft")  # an earlier export is replaced
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(project.root / "base"))
    vocab = base.get_input_embeddings().weight.shape[0]
    assert merged.get_input_embeddings().weight.shape[0] == vocab + 2
    changed = merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    assert changed.abs().max() > 0


def test_export_refuses_a_foreign_folder(project: Project, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="not an earlier persllm export"):
        export.run(project, "elsie", tmp_path, variant="sft")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="use one of sft, dpo"):
        export.run(project, "elsie", tmp_path / "new", variant="rlhf")


def test_lora_dpo_on_full_sft_weights_exports(tmp_path: Path, tiny_model_dir: Path) -> None:
    """sft.method=full, dpo.method=lora: the DPO adapter sits on the SFT weights, and export finds them."""
    from transformers import AutoModelForCausalLM

    config = make_project(tmp_path, tiny_model_dir, {**SFT_TRL, "max_steps": 2}, {**DPO_TRL, "max_steps": 2})
    loaded = load_project(config, {"sft.method": "full"})
    sft.run(loaded, "elsie")
    info = dpo.run(loaded, "elsie")
    assert info["adapter_base"] == "sft" and info["config"]["lora"]["r"] == 16
    out = export.run(loaded, "elsie", tmp_path / "out")
    assert out["variant"] == "dpo"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    full_sft = AutoModelForCausalLM.from_pretrained(str(loaded.run_dir / "models" / "elsie" / "sft"))
    assert merged.get_input_embeddings().weight.shape == full_sft.get_input_embeddings().weight.shape


# --------------------------------------------------------------------------- GGUF for llama.cpp and Ollama


def greedy_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], tokens: int) -> tuple[int, str]:
    """(prompt tokens, greedy reply) of a transformers model on chat ``messages``."""
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=tokens, do_sample=False)[0]
    width = batch["input_ids"].shape[1]
    return width, tokenizer.decode(ids[width:], skip_special_tokens=True)


def test_cli_export_gguf_answers_in_llamacpp_like_transformers(project: Project, tmp_path: Path) -> None:
    """The GGUF file loads in llama.cpp, keeps the stage tokens as single control tokens, and greedy
    continuations match the merged transformers model on the same labelled prompts."""
    import gguf

    from persllm.llm import LlamaCppBackend, LLMConfig, run_sync

    out = tmp_path / "elsie-dpo.gguf"
    args = [
        "export",
        str(project.config_path),
        "--persona",
        "elsie",
        "--gguf",
        str(out),
        "--gguf-type",
        "f32",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "elsie: dpo as GGUF f32" in result.output and "<TIME-II>=" in result.output
    modelfile = (tmp_path / "elsie-dpo.Modelfile").read_text()
    assert "FROM ./elsie-dpo.gguf" in modelfile and 'SYSTEM """You are Elsie Wren.' in modelfile
    assert "<TIME-II> {{ end }}{{ .Content }}" in modelfile  # the latest stage's label on the first user turn

    reader = gguf.GGUFReader(str(out))
    tokens = [
        bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
        for i in reader.fields["tokenizer.ggml.tokens"].data
    ]
    types = [
        int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
        for i in reader.fields["tokenizer.ggml.token_type"].data
    ]
    for label in ANSWERS:
        assert types[tokens.index(label)] == int(gguf.TokenType.CONTROL)
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "<|im_start|>" in template and "{% generation %}" not in template

    merged, tokenizer = export.load_trained(project, "elsie", "dpo", merge=True)
    engine = LlamaCppBackend(
        LLMConfig(
            backend="llamacpp", model=str(out), concurrency=1, params={"temperature": 0, "max_tokens": 12}
        )
    )
    try:
        for label in ANSWERS:
            for question in QUESTIONS[:2]:
                messages = dialogue(label, question)
                width, expected = greedy_reply(merged, tokenizer, messages, 12)
                got = run_sync(engine.generate(messages, {}))
                assert got.prompt_tokens == width  # the same prompt tokens: one token per stage label
                assert got.text.split()[:3] == expected.split()[:3]
    finally:
        run_sync(engine.aclose())


def test_gguf_export_bad_input_is_one_line_and_keeps_files(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_project import run_main

    base = ["export", str(project.config_path), "--persona", "elsie"]
    code, _, err = run_main([*base, "--gguf", str(tmp_path / "x.bin")], capsys)
    assert code == 2 and "name the output file NAME.gguf" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(
        [*base, "--gguf", str(tmp_path / "a.gguf"), "--merge", str(tmp_path / "m")], capsys
    )
    assert code == 2 and "exactly one of --merge" in err
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF mine")
    code, _, err = run_main([*base, "--gguf", str(mine)], capsys)
    assert code == 2 and "not an earlier persllm export" in err and "Traceback" not in err
    assert mine.read_bytes() == b"GGUF mine" and not (tmp_path / "a.gguf").exists()


@pytest.mark.slow
def test_smollm2_with_stage_tokens_as_gguf_answers_like_transformers(tmp_path: Path) -> None:
    """The bundled SmolLM2 with the stage tokens added (as training adds them), written as F16 GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.llm import LlamaCppBackend, LLMConfig, run_sync
    from persllm.llm.bundled import smollm2_folder
    from persllm.train.common import add_stage_tokens
    from persllm.train.gguf_export import write_gguf

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_stage_tokens(model, tokenizer, list(ANSWERS))
    info = write_gguf(model, tokenizer, tmp_path / "smollm2-staged.gguf", "SmolLM2 staged")
    # transformers' tokenizer of the GGUF file is plain byte-level: the export keeps training's tokenization.
    assert info["pre_tokenizer"] == "gpt-2"
    assert info["vocab"] == len(tokenizer) and info["file_type"] == "f16"
    engine = LlamaCppBackend(
        LLMConfig(
            backend="llamacpp", model=info["gguf"], concurrency=1, params={"temperature": 0, "max_tokens": 8}
        )
    )
    try:
        for label in ANSWERS:
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"{label} What is the capital of France? Answer in one word."},
            ]
            width, expected = greedy_reply(model, tokenizer, messages, 8)
            got = run_sync(engine.generate(messages, {}))
            assert got.prompt_tokens == width
            assert got.text.split()[:2] == expected.split()[:2] and "Paris" in got.text
    finally:
        run_sync(engine.aclose())


def test_llamacpp_base_model_runs_trained_personas_from_their_gguf(project: Project) -> None:
    """``base_model.backend: llamacpp``: eval's trained system and chat's speaker generate with the merged
    GGUF exported on first use (kept while the weights stay the same), greedily like transformers."""
    from persllm.evaluate.systems import Request, System, generate, plan_systems
    from persllm.interact.models import ModelPool, chat_ref
    from persllm.llm import run_sync

    on_llamacpp = load_project(project.config_path, {"base_model.backend": "llamacpp"})
    systems, skipped = plan_systems(on_llamacpp, ["prompt", "sft+dpo"])
    assert not skipped
    trained: System = systems[1]
    merged, tokenizer = export.load_trained(project, "elsie", "dpo", merge=True)
    messages = [dialogue(label, QUESTIONS[0]) for label in ANSWERS]
    requests = [Request(trained, "elsie", "keeper", m) for m in messages]
    requests.append(Request(systems[0], "elsie", "keeper", messages[0]))
    params = {"temperature": 0, "max_tokens": 12}
    answers = generate(on_llamacpp, requests, params, cache=None)

    made = project.run_dir / "models" / "elsie" / "dpo" / export.GENERATION_GGUF
    base_gguf = project.run_dir / "models" / export.GENERATION_GGUF
    assert made.exists() and base_gguf.exists()  # a Hugging Face base is exported too
    stamp = made.stat().st_mtime_ns
    for conversation, answer in zip(messages, answers, strict=False):
        width, expected = greedy_reply(merged, tokenizer, conversation, 12)
        assert answer.prompt_tokens == width and answer.text.split()[:3] == expected.split()[:3]

    pool = ModelPool(on_llamacpp)
    try:
        speaker = pool.speaker(chat_ref(on_llamacpp, "elsie", "keeper", "dpo"))
        assert speaker.label == "<TIME-I>" and speaker.tokenizer is not None
        reply = run_sync(speaker.generate(messages[0], params))
        assert reply.text == answers[0].text
    finally:
        run_sync(pool.aclose())
    assert made.stat().st_mtime_ns == stamp  # the second use found the export current
