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
