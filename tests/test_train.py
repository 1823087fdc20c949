"""SFT and DPO on the tiny model: loss, weights, stage labels, margins, resume, config errors, CLI."""

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from persllm.cli import app
from persllm.config import Project, load_project
from persllm.config.stages import DPOSettings, SFTSettings
from persllm.errors import UserError
from persllm.jsonl import write_jsonl
from persllm.prompting import split_inline
from persllm.train import common, dpo, sft

pytestmark = pytest.mark.slow  # one trained tiny model per module: `make test-fast` skips it

SYSTEM = "You are Elsie Wren, lighthouse keeper's daughter of Skerrow Point."
QUESTIONS = [
    "What is your work?",
    "What do you do all day?",
    "Tell me about your job.",
    "How do you spend a day?",
]
ANSWERS = {
    "<TIME-I>": "<think>\nKeeper years: I tend the lamp.\n</think>\nI keep the light at Skerrow Point.",
    "<TIME-II>": "<think>\nHarbour years: the wall goes up.\n</think>\nI build the new harbour wall.",
}
# The base already writes both answers (know_the_answers); 100 LoRA steps teach it which label wants which.
SFT_TRL = {
    "max_steps": 100,
    "learning_rate": 1e-2,
    "per_device_train_batch_size": 8,
    "logging_steps": 10,
    "save_steps": 1000,
    "max_length": 128,
}
DPO_TRL = {
    "max_steps": 12,
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 8,
    "logging_steps": 1,
    "beta": 0.1,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny models train several times faster on one thread than on an oversubscribed shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dialogue(label: str, question: str, answer: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{label} {question}"}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def know_the_answers(base: Path) -> Path:
    """Train the tiny base on both answers without labels: it can write them, not choose between them.

    A LoRA adapter leaves the (tied) embeddings alone, so tokens the base never learnt to produce keep
    near-random output rows, and no adapter could make them likely."""
    from tests.conftest import TINY_DIALOGUES
    from tests.tiny import pretrain_tiny_model

    plain = [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        for question in QUESTIONS
        for answer in ANSWERS.values()
    ]
    return pretrain_tiny_model(base, TINY_DIALOGUES + plain, steps=100)


def make_project(root: Path, base_model: Path, sft_trl: dict[str, Any], dpo_trl: dict[str, Any]) -> Path:
    """A one-persona, two-stage project whose data/ already holds SFT rows and DPO pairs."""
    for stage in ("keeper", "engineer"):
        (root / "corpus" / stage).mkdir(parents=True)
        (root / "corpus" / stage / "facts.md").write_text(f"Elsie works as a {stage}.\n", encoding="utf-8")
    persona = {
        "id": "elsie",
        "name": "Elsie Wren",
        "stages": [
            {"id": "keeper", "time": "It is 1889.", "knowledge": ["../corpus/keeper/*.md"]},
            {"id": "engineer", "time": "It is 1905.", "knowledge": ["../corpus/engineer/*.md"]},
        ],
    }
    (root / "personas").mkdir()
    (root / "personas" / "elsie.yaml").write_text(yaml.safe_dump(persona), encoding="utf-8")
    config = {
        "project": "traintest",
        "personas": ["personas/elsie.yaml"],
        "seed": 7,
        "base_model": {"model": str(base_model)},
        "sft": {"trl": sft_trl, "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        "dpo": {"trl": dpo_trl},
    }
    (root / "persllm.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    data = root / "runs" / "traintest" / "data" / "elsie"
    rows, pairs = [], []
    for index, question in enumerate(QUESTIONS):
        for stage, (label, answer) in zip(("keeper", "engineer"), ANSWERS.items(), strict=True):
            meta = {"id": f"{stage}-{index}", "persona": "elsie", "stage": stage, "kind": "ordinary"}
            rows.append({"messages": dialogue(label, question, answer), "meta": {**meta, "label": label}})
            other = ANSWERS["<TIME-II>" if label == "<TIME-I>" else "<TIME-I>"]
            pairs.append(
                {
                    "prompt": dialogue(label, question),
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": other}],
                    "meta": {**meta, "provenance": "cross_stage"},
                }
            )
    write_jsonl(data / "sft_train.jsonl", rows * 3)
    write_jsonl(data / "sft_test.jsonl", rows[:2])
    write_jsonl(data / "dpo_train.jsonl", pairs)
    return root / "persllm.yaml"


def greedy_answer(model: Any, tokenizer: Any, label: str, question: str) -> str:
    batch = tokenizer.apply_chat_template(
        dialogue(label, question), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(out[0][batch["input_ids"].shape[1] :], skip_special_tokens=True)


@contextmanager
def watching_parameters(changed: dict[str, dict[str, bool]]) -> Iterator[None]:
    """Record, per trainer ("sft", "dpo"), whether each trainable parameter differs after ``train``."""
    import trl

    with pytest.MonkeyPatch.context() as patch:
        for kind, trainer_class in (("sft", trl.SFTTrainer), ("dpo", trl.DPOTrainer)):

            def watched(
                self: Any, *args: Any, _real: Any = trainer_class.train, _kind: str = kind, **kw: Any
            ) -> Any:
                params = self.model.named_parameters()
                before = {name: p.detach().clone() for name, p in params if p.requires_grad}
                result = _real(self, *args, **kw)
                after = dict(self.model.named_parameters())
                changed[_kind] = {
                    name: not torch.equal(before[name], after[name].detach()) for name in before
                }
                return result

            patch.setattr(trainer_class, "train", watched)
        yield


CHANGED: dict[str, dict[str, bool]] = {}  # filled by the ``trained`` fixture


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """One SFT run through the CLI (``persllm train sft``), then one DPO run through ``dpo.run``."""
    root = tmp_path_factory.mktemp("trainproj")
    base = know_the_answers(shutil.copytree(tiny_model_dir, root / "base"))
    config = make_project(root, base, SFT_TRL, DPO_TRL)
    with watching_parameters(CHANGED):
        result = CliRunner().invoke(app, ["train", "sft", str(config), "--persona", "elsie"])
        assert result.exit_code == 0, result.output
        assert "elsie: sft 100 steps" in result.output and "models/elsie/sft" in result.output
        project = load_project(config)
        dpo.run(*DPOSettings.of_project(project), "elsie")
    return project


def test_sft_and_dpo_change_every_trainable_parameter(trained: Project) -> None:
    for kind in ("sft", "dpo"):
        unchanged = [name for name, moved in CHANGED[kind].items() if not moved]
        assert CHANGED[kind] and unchanged == [], f"{kind}: {unchanged[:5]}"


def sft_dir(project: Project) -> Path:
    return project.run_dir / "models" / "elsie" / "sft"


# --------------------------------------------------------------------------- SFT


def test_sft_loss_falls_and_outputs_are_written(trained: Project) -> None:
    info = json.loads((sft_dir(trained) / "training.json").read_text())
    losses = [entry["loss"] for entry in info["losses"]]
    assert info["steps"] == 100 and len(losses) == 10
    assert losses[-1] < 0.3 * losses[0]
    assert info["eval_loss"] is not None and info["eval_loss"] < losses[0]
    assert info["tokens"] > 0 and info["tokens_per_second"] > 0
    assert info["config"]["trl"]["learning_rate"] == 1e-2 and info["config"]["trl"]["seed"] == 7
    assert (sft_dir(trained) / "adapter_model.safetensors").exists()
    manifest = json.loads((trained.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["train_sft"]["personas"]["elsie"]["steps"] == 100


def test_sft_writes_a_plain_lora_adapter(trained: Project) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(sft_dir(trained) / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)  # LoRA B starts at zero
    assert all("lora_A" in name or "lora_B" in name for name in weights)  # no embedding copies
    config = json.loads((sft_dir(trained) / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and config["peft_type"] == "LORA"
    info = json.loads((sft_dir(trained) / "training.json").read_text())
    assert info["label_kind"] == "text" and info["added_token_ids"] == [] and info["stage_tokens"] == {}
    assert info["stage_labels"] == {"keeper": "<TIME-I>", "engineer": "<TIME-II>"}


def test_sft_adapter_loads_with_plain_peft_and_answers_by_stage_label(
    trained: Project, tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sft_dir(trained)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base_tokenizer = AutoTokenizer.from_pretrained(str(trained.config.base_model.model))
    assert len(tokenizer) == len(base_tokenizer)  # the labels are text the base already has
    assert tokenizer.chat_template == base_tokenizer.chat_template
    config = json.loads((folder / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    for label, answer in ANSWERS.items():
        _, response = split_inline(greedy_answer(model, tokenizer, label, QUESTIONS[0]))
        assert response == split_inline(answer)[1]


def test_sft_folder_has_a_model_card(trained: Project) -> None:
    card = (sft_dir(trained) / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == trained.config.base_model.model and front["library_name"] == "peft"
    assert "| keeper | `<TIME-I>` | You are Elsie Wren" in card
    assert "24 training dialogues, 2 test dialogues" in card
    assert "PeftModel.from_pretrained" in card and "--enable-lora" in card and "--gguf DIR" in card
    assert "Not evaluated yet" in card


def test_new_tokens_kind_trains_the_label_rows(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    trl = {**SFT_TRL, "max_steps": 20, "logging_steps": 20}
    project = load_project(make_project(tmp_path, base, trl, DPO_TRL), {"stage_labels.kind": "new_tokens"})
    info = sft.run(*SFTSettings.of_project(project), "elsie")
    folder = sft_dir(project)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    embeddings = [tensor for name, tensor in weights.items() if "embed_tokens" in name]
    assert len(embeddings) == 1  # tied embeddings stay tied: one trained matrix
    first, second = info["stage_tokens"]["<TIME-I>"], info["stage_tokens"]["<TIME-II>"]
    assert info["added_token_ids"] == [first, second] and info["label_kind"] == "new_tokens"
    # Both rows started at the same mean vector; training pulled them apart.
    assert not torch.allclose(embeddings[0][first], embeddings[0][second])
    assert "cannot load it; merge it instead" in (folder / "README.md").read_text()


# --------------------------------------------------------------------------- DPO


def test_dpo_margin_rises_and_adapter_is_saved(trained: Project) -> None:
    folder = trained.run_dir / "models" / "elsie" / "dpo"
    info = json.loads((folder / "training.json").read_text())
    margins = [entry["margin"] for entry in info["margins"]]
    assert info["steps"] == 12 and len(margins) == 12
    assert margins[0] == pytest.approx(0.0, abs=1e-4)  # step 1: policy == reference (the SFT model)
    assert margins[-1] > margins[0] + 0.1
    assert (folder / "adapter_model.safetensors").exists() and not (folder / "ref").exists()
    assert info["adapter_base"] == "base_model" and info["reference"].endswith("models/elsie/sft")
    # Pairs it never trained on: the policy prefers the chosen reply more than the SFT model does.
    pairs = len(QUESTIONS) * 2
    held = info["heldout_pairs"]
    assert (
        info["heldout_rows"] == held["pairs"] == round(0.15 * pairs)
        and info["train_rows"] == pairs - held["pairs"]
    )
    assert held["margin"]["value"] > 0 and held["accuracy"]["value"] == 1.0
    assert held["accuracy"]["low"] <= held["accuracy"]["value"] <= held["accuracy"]["high"]
    assert (
        json.loads((trained.run_dir / "manifest.json").read_text())["stages"]["train_dpo"]["personas"][
            "elsie"
        ]["heldout_pairs"]
        == held
    )


def test_dpo_refuses_an_sft_adapter_from_another_base_model(trained: Project, tmp_path: Path) -> None:
    other = load_project(trained.config_path, {"base_model.model": str(tmp_path / "another-model")})
    with pytest.raises(UserError, match=r"base_model\.model: the SFT adapter .* was trained on"):
        dpo.run(*DPOSettings.of_project(other), "elsie")


def test_dpo_without_sft_model_is_a_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = make_project(tmp_path, tiny_model_dir, SFT_TRL, DPO_TRL)
    with pytest.raises(UserError, match="no SFT model; train it first"):
        dpo.run(*DPOSettings.of_project(load_project(config)), "elsie")


# --------------------------------------------------------------------------- resume


def test_resume_continues_global_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    trl = {**SFT_TRL, "max_steps": 3, "save_steps": 3, "logging_steps": 1}
    project = load_project(make_project(tmp_path, base, trl, DPO_TRL), {"sft.keep_checkpoints": True})
    first = sft.run(*SFTSettings.of_project(project), "elsie")
    checkpoints = project.run_dir / "models" / "elsie" / "checkpoints" / "sft"
    assert first["steps"] == 3 and (checkpoints / "checkpoint-3").is_dir()
    second = sft.run(*SFTSettings.of_project(project), "elsie", resume=True, max_steps=6)
    assert second["resumed_from"].endswith("checkpoint-3")
    # The log history travels with the checkpoint: steps 1-3 as the first run logged them, then 4-6.
    assert second["steps"] == 6 and [e["step"] for e in second["losses"]] == [1, 2, 3, 4, 5, 6]
    assert second["losses"][:3] == first["losses"]
    assert second["tokens"] > first["tokens"] > 0
    assert (checkpoints / "checkpoint-6").is_dir()


# --------------------------------------------------------------------------- units


def test_stage_tokens_are_single_ids_with_mean_rows(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    before = model.get_input_embeddings().weight.detach().clone()
    new_ids = common.add_stage_tokens(model, tokenizer, ["<TIME-I>", "<TIME-II>", "<|im_end|>"])
    assert new_ids == [before.shape[0], before.shape[0] + 1]  # <|im_end|> already existed
    after = model.get_input_embeddings().weight
    assert after.shape[0] == before.shape[0] + 2
    assert torch.equal(after[: before.shape[0]], before)
    for token_id in new_ids:
        assert torch.allclose(after[token_id], before.mean(dim=0))
    assert model.get_output_embeddings().weight.data_ptr() == after.data_ptr()
    assert tokenizer("<TIME-II> hi", add_special_tokens=False)["input_ids"][0] == new_ids[1]
    assert common.add_stage_tokens(model, tokenizer, ["<TIME-I>"]) == []


def test_untied_output_rows_get_their_own_mean(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    head = model.get_output_embeddings().weight.detach().clone()
    (new_id,) = common.add_stage_tokens(model, tokenizer, ["<TIME-I>"])
    assert torch.allclose(model.get_output_embeddings().weight[new_id], head.mean(dim=0))
    assert not torch.allclose(model.get_input_embeddings().weight[new_id], head.mean(dim=0))


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chatml_without_markers_gets_the_training_twin(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    project = load_project(make_project(tmp_path, tiny_model_dir, SFT_TRL, DPO_TRL))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert (
        common.training_chat_template(project.workspace, tokenizer) is None
    )  # the tiny template has markers
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    twin = common.training_chat_template(project.workspace, tokenizer)
    assert twin is not None and "{%- generation -%}" in twin
    for messages in (dialogue("<TIME-I>", "q", "a"), dialogue("<TIME-I>", "q", "a")[1:]):
        for prompt in (False, True):
            kwargs = {"tokenize": False, "add_generation_prompt": prompt}
            assert tokenizer.apply_chat_template(messages, chat_template=twin, **kwargs) == (
                tokenizer.apply_chat_template(messages, **kwargs)
            )
    out = tokenizer.apply_chat_template(
        dialogue("<TIME-I>", "q", "the answer"),
        chat_template=twin,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    trained_ids = [i for i, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(trained_ids) == "the answer<|im_end|>"
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(UserError, match="no training twin"):
        common.training_chat_template(project.workspace, tokenizer)


def test_trl_typo_is_a_one_line_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = make_project(tmp_path, tiny_model_dir, {"lernin_rate": 1e-4}, DPO_TRL)
    with pytest.raises(
        UserError, match=r"sft\.trl\.lernin_rate: unknown TRL SFTConfig argument; did you mean"
    ):
        common.validate_trl_blocks(load_project(config))
    result = CliRunner().invoke(app, ["train", "sft", str(config)])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dpo.trl.betta", "0.2", r"dpo\.trl\.betta: unknown TRL DPOConfig argument; did you mean 'beta'"),
        ("sft.lora.rank", "4", r"sft\.lora\.rank: unknown peft LoraConfig argument"),
        ("sft.trl.output_dir", "x", r"sft\.trl\.output_dir: set by persllm"),
        ("sft.trl.lr_scheduler_type", "wobbly", r"sft\.trl: .*wobbly"),
    ],
)
def test_bad_trl_and_lora_values_are_user_errors(
    tmp_path: Path, tiny_model_dir: Path, key: str, value: str, message: str
) -> None:
    config = make_project(tmp_path, tiny_model_dir, SFT_TRL, DPO_TRL)
    with pytest.raises(UserError, match=message):
        common.validate_trl_blocks(load_project(config, {key: value}))


@pytest.mark.parametrize(("trl_block", "expected"), [({}, False), ({"gradient_checkpointing": True}, True)])
def test_checkpointing_uses_the_current_name_without_a_deprecation_warning(
    tmp_path: Path, tiny_model_dir: Path, trl_block: dict[str, Any], expected: bool
) -> None:
    project = load_project(make_project(tmp_path, tiny_model_dir, {**SFT_TRL, **trl_block}, DPO_TRL))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = common.build_trl_args(*SFTSettings.of_project(project), tmp_path / "out", {})
    assert args.activation_checkpointing is expected and args.gradient_checkpointing is expected


def test_missing_data_is_a_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    project = load_project(make_project(tmp_path, tiny_model_dir, SFT_TRL, DPO_TRL))
    (project.run_dir / "data" / "elsie" / "sft_train.jsonl").unlink()
    with pytest.raises(UserError, match=r"sft_train\.jsonl: not found; build it first \(persllm curate"):
        sft.run(*SFTSettings.of_project(project), "elsie")


def test_help_texts_end_with_examples() -> None:
    runner = CliRunner()
    for command in (["train"], ["train", "sft"], ["train", "dpo"], ["export"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example: persllm " in result.output
    assert "--resume" in runner.invoke(app, ["train", "sft", "--help"]).output
    assert "--merge" in runner.invoke(app, ["export", "--help"]).output
