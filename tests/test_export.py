"""``persllm export``: merged weights that reload with plain transformers, and GGUF files for llama.cpp
and Ollama (one base file and a LoRA adapter file per persona, or one merged file) that answer like
transformers."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from persllm.cli import app
from persllm.config import Project, load_project
from persllm.config.stages import DPOSettings, EvalSettings, SFTSettings
from persllm.errors import UserError
from persllm.train import dpo, export, gguf_files, sft
from tests.test_train import ANSWERS, DPO_TRL, QUESTIONS, SFT_TRL, dialogue, know_the_answers, make_project

pytestmark = pytest.mark.slow  # trained tiny models exported and loaded again: `make test-fast` skips it


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_project(root: Path, tiny_model_dir: Path, overrides: dict[str, Any] | None = None) -> Project:
    """A short SFT then a short DPO: enough to move every trained weight away from the base."""
    base = know_the_answers(shutil.copytree(tiny_model_dir, root / "base"))
    config = make_project(root, base, {**SFT_TRL, "max_steps": 30}, {**DPO_TRL, "max_steps": 2})
    loaded = load_project(config, overrides)
    sft.run(*SFTSettings.of_project(loaded), "elsie")
    dpo.run(*DPOSettings.of_project(loaded), "elsie")
    return loaded


@pytest.fixture(scope="module")
def project(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """Trained with the default text stage labels: plain LoRA adapters."""
    return trained_project(tmp_path_factory.mktemp("exportproj"), tiny_model_dir)


@pytest.fixture(scope="module")
def grown(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """Trained with stage_labels.kind: new_tokens: the adapters grow the vocabulary."""
    root = tmp_path_factory.mktemp("grownproj")
    return trained_project(root, tiny_model_dir, {"stage_labels.kind": "new_tokens"})


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
    assert "elsie: dpo merged" in result.output and "<TIME-II>=" not in result.output  # text labels
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    adapter_model, adapter_tokenizer = export.load_trained(project, "elsie", "dpo")
    assert tokenizer.chat_template == adapter_tokenizer.chat_template
    marker = json.loads((out / export.MARKER).read_text())
    assert marker["stage_labels"] == {"keeper": "<TIME-I>", "engineer": "<TIME-II>"}
    assert marker["stage_tokens"] == {}
    for label in ANSWERS:
        batch = prompt_ids(tokenizer, label)
        with torch.no_grad():
            expected = adapter_model(**batch).logits
            got = merged(**batch).logits
            assert torch.allclose(got, expected, atol=1e-4)
            generated = merged.generate(**batch, max_new_tokens=12, do_sample=False)
        assert generated.shape[1] > batch["input_ids"].shape[1]
    # The tied input/output embeddings stay one matrix in the exported model.
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


def test_export_sft_differs_from_base_and_replaces_earlier_export(grown: Project, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "elsie-sft"
    first = export.run(grown, "elsie", out, variant="sft")
    assert first["variant"] == "sft" and first["training"]["stage"] == "sft"
    assert set(first["stage_tokens"]) == set(ANSWERS)  # new tokens: one id per label
    export.run(grown, "elsie", out, variant="sft")  # an earlier export is replaced
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(grown.root / "base"))
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
    sft.run(*SFTSettings.of_project(loaded), "elsie")
    info = dpo.run(*DPOSettings.of_project(loaded), "elsie")
    assert info["adapter_base"] == "sft" and info["config"]["lora"]["r"] == 16
    out = export.run(loaded, "elsie", tmp_path / "out")
    assert out["variant"] == "dpo"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    full_sft = AutoModelForCausalLM.from_pretrained(str(loaded.run_dir / "models" / "elsie" / "sft"))
    assert merged.get_input_embeddings().weight.shape == full_sft.get_input_embeddings().weight.shape


# --------------------------------------------------------------------------- GGUF for llama.cpp and Ollama


def opening(text: str, words: int = 3) -> list[str]:
    """The first words of a greedy reply: two engines agree on them, while later tokens may part on a
    rounding difference (llama.cpp and transformers order their float sums differently)."""
    return text.split()[:words]


def greedy_reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], tokens: int) -> tuple[int, str]:
    """(prompt tokens, greedy reply) of a transformers model on chat ``messages``."""
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=tokens, do_sample=False)[0]
    width = batch["input_ids"].shape[1]
    return width, tokenizer.decode(ids[width:], skip_special_tokens=True)


def run_export(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from tests.test_cli_project import run_main

    return run_main(["export", *args], capsys)


def llamacpp(model: Path, adapters: dict[str, Path] | None = None, tokens: int = 12) -> Any:
    from persllm.llm import LlamaCppBackend, LLMConfig

    engine = LlamaCppBackend(
        LLMConfig(
            backend="llamacpp",
            model=str(model),
            concurrency=2,
            params={"temperature": 0, "max_tokens": tokens},
        )
    )
    for name, path in (adapters or {}).items():
        engine.add_adapter(name, path)
    return engine


def test_cli_export_gguf_merged_keeps_new_tokens_as_control_tokens(grown: Project, tmp_path: Path) -> None:
    """One merged file (``--gguf NAME.gguf``) of a persona trained with new tokens: they are single
    control tokens in llama.cpp, and greedy replies match the merged transformers model."""
    import gguf

    from persllm.llm import run_sync

    out = tmp_path / "elsie-dpo.gguf"
    args = ["export", str(grown.config_path), "--persona", "elsie", "--gguf", str(out), "--gguf-type", "f32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "elsie: dpo as GGUF f32" in result.output and "<TIME-II>=" in result.output
    modelfile = (tmp_path / "elsie-dpo.Modelfile").read_text()
    assert "FROM ./elsie-dpo.gguf" in modelfile and 'SYSTEM """You are Elsie Wren.' in modelfile
    assert "ADAPTER" not in modelfile
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

    merged, tokenizer = export.load_trained(grown, "elsie", "dpo", merge=True)
    engine = llamacpp(out)
    try:
        for label in ANSWERS:
            for question in QUESTIONS[:2]:
                messages = dialogue(label, question)
                width, expected = greedy_reply(merged, tokenizer, messages, 12)
                got = run_sync(engine.generate(messages, {}))
                assert got.prompt_tokens == width  # the same prompt tokens: one token per stage label
                assert opening(got.text) == opening(expected)
    finally:
        run_sync(engine.aclose())


def test_cli_export_gguf_dir_is_one_base_and_small_adapters_that_answer_like_transformers(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--gguf DIR``: the base once, each trained variant as a llama.cpp LoRA adapter; one engine runs
    both adapters side by side with the greedy replies of the PEFT adapters in transformers."""
    from persllm.llm import LLMConfig, TransformersBackend, run_sync

    out = tmp_path / "gguf"
    config = str(project.config_path)
    code, printed, err = run_export(
        [config, "--gguf", str(out), "--gguf-type", "f32", "--model", "sft"], capsys
    )
    assert code == 0, err
    assert "base: " in printed and "elsie: sft as lora GGUF f32" in printed
    base_file, made = out / "base.gguf", base_stamp(out)
    code, printed, err = run_export(
        [config, "--gguf", str(out), "--gguf-type", "f32", "--model", "dpo"], capsys
    )
    assert code == 0, err
    assert base_stamp(out) == made and "base: " in printed  # the same base is not written again
    modelfile = (out / "elsie.Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./elsie-dpo.lora.gguf\n" in modelfile
    sft_file, dpo_file = out / "elsie-sft.lora.gguf", out / "elsie-dpo.lora.gguf"
    assert sft_file.stat().st_size * 3 < base_file.stat().st_size

    adapters = {v: project.run_dir / "models" / "elsie" / v for v in ("sft", "dpo")}
    reference = TransformersBackend(
        LLMConfig(
            model=project.config.base_model.model, device="cpu", params={"temperature": 0, "max_tokens": 12}
        )
    )
    for name, folder in adapters.items():
        reference.add_adapter(name, folder)
    engine = llamacpp(base_file, {"sft": sft_file, "dpo": dpo_file})
    conversations = [dialogue(label, question) for label in ANSWERS for question in QUESTIONS[:2]]
    try:
        replies: dict[str, list[str]] = {}
        for name in ("dpo", "base", "sft"):
            expected = reference.generate_batch(conversations, {"adapter": name})
            got = [run_sync(engine.generate(m, {"adapter": name})) for m in conversations]
            assert [g.prompt_tokens for g in got] == [e.prompt_tokens for e in expected]
            assert [opening(g.text) for g in got] == [opening(e.text) for e in expected], name
            replies[name] = [g.text for g in got]
        assert replies["sft"] != replies["base"]  # the adapter really changes what the base says
    finally:
        run_sync(engine.aclose())


def base_stamp(out: Path) -> int:
    return (out / "base.gguf").stat().st_mtime_ns


def test_gguf_dir_exports_a_new_tokens_persona_merged(grown: Project, tmp_path: Path) -> None:
    info = gguf_files.export_dir(grown, tmp_path / "gguf", file_type="f16")
    (item,) = info["personas"]
    assert info["base"] is None and not (tmp_path / "gguf" / "base.gguf").exists()
    assert item["form"] == "merged" and item["gguf"].endswith("elsie-dpo.gguf")
    modelfile = (tmp_path / "gguf" / "elsie.Modelfile").read_text()
    assert "FROM ./elsie-dpo.gguf" in modelfile and "ADAPTER" not in modelfile


def test_gguf_q8_0_export_is_smaller_and_runs(project: Project, tmp_path: Path) -> None:
    from persllm.llm import run_sync

    f16 = gguf_files.export_dir(project, tmp_path / "f16", file_type="f16")
    q8 = gguf_files.export_dir(project, tmp_path / "q8", file_type="q8_0")
    assert q8["base"]["file_type"] == "q8_0" and q8["base"]["bytes"] < f16["base"]["bytes"]
    engine = llamacpp(Path(q8["base"]["gguf"]), {"dpo": Path(q8["personas"][0]["gguf"])})
    try:
        reply = run_sync(engine.generate(dialogue("<TIME-I>", QUESTIONS[0]), {"adapter": "dpo"}))
        assert reply.completion_tokens > 0
    finally:
        run_sync(engine.aclose())


def test_gguf_export_bad_input_is_one_line_and_keeps_files(
    project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [str(project.config_path), "--persona", "elsie"]
    code, _, err = run_export([*base, "--gguf", str(tmp_path / "out"), "--gguf-type", "q4_k"], capsys)
    assert code == 2 and "--gguf-type 'q4_k': use one of f16, f32, q8_0" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    code, _, err = run_export(
        [*base, "--gguf", str(tmp_path / "a.gguf"), "--merge", str(tmp_path / "m")], capsys
    )
    assert code == 2 and "exactly one of --merge" in err
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF mine")
    code, _, err = run_export([*base, "--gguf", str(mine)], capsys)
    assert code == 2 and "not an earlier persllm export" in err and "Traceback" not in err
    assert mine.read_bytes() == b"GGUF mine" and not (tmp_path / "a.gguf").exists()
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "base.gguf").write_text("mine")
    code, _, err = run_export([*base, "--gguf", str(folder)], capsys)
    assert code == 2 and "not an earlier persllm --gguf export" in err
    assert (folder / "base.gguf").read_text() == "mine" and len(list(folder.iterdir())) == 1


def test_llamacpp_backend_refuses_what_is_not_a_gguf_lora(project: Project, tmp_path: Path) -> None:
    from persllm.llm import LlamaCppBackend, LLMConfig

    info = gguf_files.export_dir(project, tmp_path / "gguf", file_type="f16")
    base = info["base"]["gguf"]
    peft_folder = project.run_dir / "models" / "elsie" / "sft"
    with pytest.raises(UserError, match=r"is a PEFT adapter folder; .* persllm export CONFIG --gguf DIR"):
        LlamaCppBackend(LLMConfig(backend="llamacpp", model=base, adapter=str(peft_folder)))
    with pytest.raises(UserError, match=r"is a GGUF model, not a LoRA adapter"):
        LlamaCppBackend(LLMConfig(backend="llamacpp", model=base, adapter=base))
    engine = LlamaCppBackend(LLMConfig(backend="llamacpp", model=base))
    with pytest.raises(UserError, match="is not a GGUF file"):
        engine.add_adapter("elsie", tmp_path / "gguf" / "elsie.Modelfile")


def test_persllm_adapters_pass_vllms_lora_rules_and_new_tokens_do_not(
    project: Project, grown: Project
) -> None:
    from persllm.train.vllm_check import max_lora_rank, vllm_problems

    vocab = json.loads((project.root / "base" / "config.json").read_text())["vocab_size"]
    for variant in ("sft", "dpo"):
        folder = project.run_dir / "models" / "elsie" / variant
        assert vllm_problems(folder, base_vocab=vocab) == [] and max_lora_rank(folder) == 8
    problems = " | ".join(vllm_problems(grown.run_dir / "models" / "elsie" / "sft", base_vocab=vocab))
    assert "modules_to_save ['embed_tokens'" in problems and "is not a LoRA weight vLLM loads" in problems
    assert "no LoRA extra vocabulary" in problems


def test_cli_export_vllm_prints_the_serve_command_or_says_what_vllm_refuses(
    project: Project, grown: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    code, printed, _ = run_export([str(project.config_path), "--vllm"], capsys)
    folder = project.run_dir / "models" / "elsie" / "dpo"
    base = project.config.base_model.model
    assert code == 0 and printed.strip() == (
        f"vllm serve {base} --enable-lora --max-lora-rank 8 --lora-modules elsie-dpo={folder}"
    )
    code, _, err = run_export([str(grown.config_path), "--vllm", "--model", "sft"], capsys)
    assert code == 2 and "vLLM would refuse this adapter (modules_to_save" in err


def test_vllm_rules_catch_what_vllm_refuses(project: Project, tmp_path: Path) -> None:
    from persllm.train.vllm_check import vllm_problems

    folder = shutil.copytree(project.run_dir / "models" / "elsie" / "sft", tmp_path / "adapter")
    settings = json.loads((folder / "adapter_config.json").read_text())
    settings.update(use_dora=True, bias="all", r=1024, init_lora_weights="pissa")
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    problems = " | ".join(vllm_problems(folder))
    for expected in ("use_dora", "bias 'all'", "rank over 512", "init_lora_weights 'pissa'"):
        assert expected in problems
    (folder / "adapter_model.safetensors").unlink()
    assert any("doesn't contain tensors" in p for p in vllm_problems(folder))


def test_tiny_qwen2_base_and_adapter_as_gguf_answer_like_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.llm import LLMConfig, TransformersBackend, run_sync
    from persllm.train.gguf_export import write_gguf, write_lora_gguf
    from tests.conftest import TINY_DIALOGUES
    from tests.test_adapter_pool import make_adapter
    from tests.tiny import build_tiny_model, pretrain_tiny_model

    folder = build_tiny_model(tmp_path / "qwen2", architecture="qwen2")
    pretrain_tiny_model(folder, TINY_DIALOGUES)
    adapter = make_adapter(str(folder), tmp_path / "adapter", seed=4)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    facts = write_gguf(
        model, AutoTokenizer.from_pretrained(str(folder)), tmp_path / "base.gguf", "qwen2", "f32"
    )
    assert facts["pre_tokenizer"] == "qwen2"
    write_lora_gguf(adapter, model.config, tmp_path / "adapter.gguf", "adapter", "f32")

    reference = TransformersBackend(
        LLMConfig(model=str(folder), device="cpu", params={"temperature": 0, "max_tokens": 10})
    )
    reference.add_adapter("a", adapter)
    engine = llamacpp(tmp_path / "base.gguf", {"a": tmp_path / "adapter.gguf"}, tokens=10)
    try:
        for name in ("a", "base"):
            for conversation in TINY_DIALOGUES:
                messages = conversation[:1]
                (expected,) = reference.generate_batch([messages], {"adapter": name})
                got = run_sync(engine.generate(messages, {"adapter": name}))
                assert got.prompt_tokens == expected.prompt_tokens, name
                assert opening(got.text) == opening(expected.text), name
    finally:
        run_sync(engine.aclose())


@pytest.mark.slow
def test_smollm2_with_stage_tokens_as_gguf_answers_like_transformers(tmp_path: Path) -> None:
    """The bundled SmolLM2 with the stage tokens added (as new_tokens training adds them), written as F16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.bundled import smollm2_folder
    from persllm.llm import run_sync
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
    engine = llamacpp(Path(info["gguf"]), tokens=8)
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


@pytest.mark.slow
def test_smollm2_base_with_lora_adapters_in_llamacpp_answers_like_transformers(tmp_path: Path) -> None:
    """SmolLM2 as one F32 base file and two LoRA adapter files on one engine: greedy replies equal the
    PEFT adapters in transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.bundled import smollm2_folder
    from persllm.llm import LLMConfig, TransformersBackend, run_sync
    from persllm.train.gguf_export import write_gguf, write_lora_gguf
    from tests.test_adapter_pool import PROMPTS, make_adapter

    folder = str(smollm2_folder())
    model = AutoModelForCausalLM.from_pretrained(folder)
    write_gguf(model, AutoTokenizer.from_pretrained(folder), tmp_path / "base.gguf", "SmolLM2", "f32")
    adapters = {}
    for index in range(2):
        peft_folder = make_adapter(folder, tmp_path / f"p{index}", seed=index, scale=0.05)
        adapters[f"p{index}"] = (peft_folder, tmp_path / f"p{index}.lora.gguf")
        write_lora_gguf(peft_folder, model.config, adapters[f"p{index}"][1], f"p{index}", "f32")
    del model
    reference = TransformersBackend(
        LLMConfig(model="bundled:smollm2", device="cpu", params={"temperature": 0, "max_tokens": 16})
    )
    for name, (peft_folder, _) in adapters.items():
        reference.add_adapter(name, peft_folder)
    engine = llamacpp(tmp_path / "base.gguf", {n: f for n, (_, f) in adapters.items()}, tokens=16)
    try:
        texts = {}
        for name in ("p1", "base", "p0"):
            expected = reference.generate_batch(PROMPTS, {"adapter": name})
            got = [run_sync(engine.generate(m, {"adapter": name})) for m in PROMPTS]
            assert [opening(g.text) for g in got] == [opening(e.text) for e in expected], name
            texts[name] = tuple(g.text for g in got)
        assert len(set(texts.values())) == 3
    finally:
        run_sync(engine.aclose())


def test_llamacpp_base_model_runs_trained_personas_as_adapters_of_one_base(project: Project) -> None:
    """``base_model.backend: llamacpp``: eval's trained system and chat's speaker are LoRA adapter files on
    the base's GGUF (exported on first use, kept while the weights stay the same), greedily like
    transformers."""
    from persllm.evaluate.systems import Request, System, generate, plan_systems
    from persllm.interact.models import ModelPool, chat_ref
    from persllm.llm import run_sync

    on_llamacpp = load_project(project.config_path, {"base_model.backend": "llamacpp"})
    systems, skipped = plan_systems(*EvalSettings.of_project(on_llamacpp), ["prompt", "sft+dpo"])
    assert not skipped
    trained: System = systems[1]
    merged, tokenizer = export.load_trained(project, "elsie", "dpo", merge=True)
    messages = [dialogue(label, QUESTIONS[0]) for label in ANSWERS]
    requests = [Request(trained, "elsie", "keeper", m) for m in messages]
    requests.append(Request(systems[0], "elsie", "keeper", messages[0]))
    params = {"temperature": 0, "max_tokens": 12}
    answers = generate(*EvalSettings.of_project(on_llamacpp), requests, params, cache=None)

    models = project.run_dir / "models"
    made = models / "elsie" / "dpo.lora.gguf"
    assert made.exists() and (models / gguf_files.GENERATION_GGUF).exists()  # the base is exported too
    assert not (models / "elsie" / "dpo" / gguf_files.GENERATION_GGUF).exists()  # no merged copy
    stamp = made.stat().st_mtime_ns
    for conversation, answer in zip(messages, answers, strict=False):
        width, expected = greedy_reply(merged, tokenizer, conversation, 12)
        assert answer.prompt_tokens == width and opening(answer.text) == opening(expected)

    pool = ModelPool(on_llamacpp)
    try:
        speaker = pool.speaker(chat_ref(on_llamacpp, "elsie", "keeper", "dpo"))
        assert speaker.label == "<TIME-I>" and speaker.tokenizer is not None
        reply = run_sync(speaker.generate(messages[0], params))
        assert reply.text == answers[0].text
    finally:
        run_sync(pool.aclose())
    assert made.stat().st_mtime_ns == stamp  # the second use found the export current
