"""SmolLM2 (the bundled real model): SFT then DPO for a few steps on a small stage-labelled dataset."""

import json
from pathlib import Path

import pytest

from persllm.bundled import resolve_model
from persllm.config import load_project
from persllm.config.stages import DPOSettings, SFTSettings
from persllm.train import dpo, sft
from persllm.train.export import load_trained
from tests.test_train import ANSWERS, QUESTIONS, greedy_answer, make_project, watching_parameters

pytestmark = pytest.mark.slow


def test_smollm2_sft_then_dpo(tmp_path: Path) -> None:
    import yaml
    from transformers import AutoTokenizer

    smollm2 = resolve_model("bundled:smollm2")
    trl = {"max_steps": 4, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "logging_steps": 1}
    config = make_project(tmp_path, Path("unused"), trl, {**trl, "max_steps": 3, "learning_rate": 5e-4})
    raw = yaml.safe_load(config.read_text())
    raw["base_model"] = {"model": "bundled:smollm2"}
    config.write_text(yaml.safe_dump(raw))
    project = load_project(config)

    changed: dict[str, dict[str, bool]] = {}
    with watching_parameters(changed):
        first = sft.run(*SFTSettings.of_project(project), "elsie")
    assert changed["sft"] and all(changed["sft"].values())
    losses = [entry["loss"] for entry in first["losses"]]
    assert first["steps"] == 4 and losses[-1] < losses[0]
    folder = project.run_dir / "models" / "elsie" / "sft"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # SmolLM2's template has no generation markers: training used the twin, the saved one is the original.
    base_tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template == base_tokenizer.chat_template
    # Text labels: the base vocabulary as it was, the label several ordinary tokens, LoRA pairs only.
    assert len(tokenizer) == len(base_tokenizer)
    for label in ANSWERS:
        assert len(tokenizer(label, add_special_tokens=False)["input_ids"]) > 1
    config_file = json.loads((folder / "adapter_config.json").read_text())
    assert not config_file["modules_to_save"] and (folder / "adapter_model.safetensors").stat().st_size < 20e6

    with watching_parameters(changed):
        second = dpo.run(*DPOSettings.of_project(project), "elsie")
    assert changed["dpo"] and all(changed["dpo"].values())
    margins = [entry["margin"] for entry in second["margins"]]
    assert second["steps"] == 3 and margins[-1] > margins[0]
    info = json.loads((project.run_dir / "models" / "elsie" / "dpo" / "training.json").read_text())
    assert info["base_model"] == smollm2 and info["tokens_per_second"] > 0

    model, tokenizer = load_trained(project, "elsie", "dpo")
    assert greedy_answer(model, tokenizer, "<TIME-I>", QUESTIONS[0]).strip()
