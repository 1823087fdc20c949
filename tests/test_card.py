"""The model card of a trained folder: front matter, prompts, engines, and the evaluation block."""

from pathlib import Path

import yaml

from persllm.config import PersonaConfig
from persllm.train.card import evaluation_lines, model_card, portable_base, with_evaluation, write_evaluation

PERSONA = PersonaConfig.model_validate(
    {
        "id": "elsie",
        "name": "Elsie Wren",
        "stages": [
            {"id": "keeper", "time": "It is 1889.", "knowledge": ["x"]},
            {"id": "engineer", "time": "It is 1905.", "knowledge": ["x"]},
        ],
    }
)
INFO = {
    "stage": "dpo",
    "label_kind": "text",
    "stage_labels": {"keeper": "<TIME-I>", "engineer": "<TIME-II>"},
    "base_model_id": portable_base("bundled:smollm2"),
    "train_rows": 42,
    "steps": 7,
    "final_loss": 0.5,
    "config": {"lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}},
}
SYSTEM = {"keeper": "You are Elsie Wren. It is 1889.", "engineer": "You are Elsie Wren. It is 1905."}
METRICS = {
    "settings": {"baseline": "prompt"},
    "counts": {"heldout_items": 63},
    "systems": {"sft+dpo": {"heldout_ci": {"style_fidelity": {"value": 0.5, "low": 0.4, "high": 0.6}}}},
    "differences": {
        "heldout": {
            "sft+dpo": {"style_fidelity": {"value": 0.1, "low": 0.02, "high": 0.2, "excludes_zero": True}}
        }
    },
}


def test_card_says_base_prompts_and_engines() -> None:
    card = model_card(PERSONA, INFO, SYSTEM)
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["library_name"] == "peft"
    assert "dpo" in front["tags"]
    assert "| engineer | `<TIME-II>` | You are Elsie Wren. It is 1905. |" in card
    assert '"content": "<TIME-II> What are you working on?"' in card
    assert "--enable-lora --max-lora-rank 16 --lora-modules elsie-dpo=" in card
    assert "42 preference pairs" in card and "Not evaluated yet" in card
    grown = model_card(PERSONA, {**INFO, "label_kind": "new_tokens"}, SYSTEM)
    assert "vllm serve" not in grown and "--merge DIR" in grown and "cannot load it" in grown


def test_evaluation_block_is_replaced_and_a_foreign_readme_kept(tmp_path: Path) -> None:
    lines = evaluation_lines(METRICS, "sft+dpo", "elsie")
    assert "on 63 items of the person's held-out real words" in lines[0]
    assert "| style_fidelity | 0.500 [0.400, 0.600] | +0.100 [+0.020, +0.200] * |" in lines
    card = model_card(PERSONA, INFO, SYSTEM)
    updated = with_evaluation(card, lines)
    assert "Not evaluated yet" not in updated and updated.count("<!-- persllm:eval -->") == 1
    assert with_evaluation(updated, ["again"]).count("again") == 1
    (tmp_path / "README.md").write_text("# my own notes\n")
    write_evaluation(tmp_path, lines)
    assert (tmp_path / "README.md").read_text() == "# my own notes\n"
    assert evaluation_lines({"systems": {}}, "sft", "elsie") == []
