"""Stage labels: plain text by default, the base's reserved tokens on request, one-line errors otherwise."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from persllm.config import load_project
from persllm.config.stages import SFTSettings
from persllm.errors import UserError
from persllm.labels import base_vocabulary, reserved_tokens
from tests.test_train import DPO_TRL, SFT_TRL, make_project

RESERVED = [f"<|reserved_special_token_{i}|>" for i in (0, 1, 2, 10)]


@pytest.fixture(scope="module")
def reserved_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with Llama 3-style reserved special tokens in its vocabulary (untrained rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("reserved") / "base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": RESERVED})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_text_labels_are_the_default(tmp_path: Path, tiny_model_dir: Path) -> None:
    project = load_project(make_project(tmp_path, tiny_model_dir, SFT_TRL, DPO_TRL))
    assert project.config.stage_labels.kind == "text"
    assert [s.label for s in project.persona("elsie").stages] == ["<TIME-I>", "<TIME-II>"]


def test_reserved_tokens_are_found_in_numeric_order() -> None:
    vocabulary = {token: True for token in reversed(RESERVED)} | {"<unused3>": True, "<unused1>": False}
    assert reserved_tokens(vocabulary) == [*RESERVED, "<unused3>"]  # a non-special spelling is not one


def test_reserved_kind_takes_the_base_tokens_and_keeps_given_labels(
    tmp_path: Path, reserved_base: Path
) -> None:
    config = make_project(tmp_path, reserved_base, SFT_TRL, DPO_TRL)
    project = load_project(config, {"stage_labels.kind": "reserved"})
    assert [s.label for s in project.persona("elsie").stages] == RESERVED[:2]
    persona_file = tmp_path / "personas" / "elsie.yaml"
    persona = yaml.safe_load(persona_file.read_text())
    persona["stages"][1]["label"] = RESERVED[0]
    persona_file.write_text(yaml.safe_dump(persona))
    project = load_project(config, {"stage_labels.kind": "reserved"})
    # The given label is kept and the other stage takes the first reserved token not already in use.
    assert [s.label for s in project.persona("elsie").stages] == [RESERVED[1], RESERVED[0]]


def test_reserved_kind_on_a_base_without_them_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli_project import run_main

    config = make_project(tmp_path, tiny_model_dir, SFT_TRL, DPO_TRL)
    with pytest.raises(
        UserError, match=r"elsie\.yaml: stages: stage_labels\.kind: reserved, .* has no reserved"
    ):
        load_project(config, {"stage_labels.kind": "reserved"})
    code, _, err = run_main(["index", str(config), "--set", "stage_labels.kind=reserved"], capsys)
    assert code == 2 and "use stage_labels.kind: text (the default) or new_tokens" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(
        UserError, match=r"stage_labels\.kind: Input should be 'text', 'reserved' or 'new_tokens'"
    ):
        load_project(config, {"stage_labels.kind": "emoji"})


def test_a_reserved_label_must_be_one_base_token(tmp_path: Path, reserved_base: Path) -> None:
    config = make_project(tmp_path, reserved_base, SFT_TRL, DPO_TRL)
    persona_file = tmp_path / "personas" / "elsie.yaml"
    persona = yaml.safe_load(persona_file.read_text())
    persona["stages"][0]["label"] = "<KEEPER>"
    persona_file.write_text(yaml.safe_dump(persona))
    with pytest.raises(UserError, match=r"label '<KEEPER>' is not one token of the base vocabulary"):
        load_project(config, {"stage_labels.kind": "reserved"})


def test_the_vocabulary_of_a_gguf_file_matches_its_tokenizer(tmp_path: Path, reserved_base: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.train.gguf_export import write_gguf

    out = tmp_path / "reserved.gguf"
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(reserved_base),
        AutoTokenizer.from_pretrained(reserved_base),
    )
    write_gguf(model, tokenizer, out, "reserved", "f32")
    from_gguf, from_folder = base_vocabulary(str(out)), base_vocabulary(str(reserved_base))
    assert set(from_gguf) >= set(from_folder)
    assert reserved_tokens(from_gguf) == reserved_tokens(from_folder) == RESERVED


def test_training_with_reserved_labels_adds_nothing(tmp_path: Path, reserved_base: Path) -> None:
    from persllm.jsonl import read_jsonl, write_jsonl
    from persllm.train import sft

    config = make_project(tmp_path, reserved_base, {**SFT_TRL, "max_steps": 3, "logging_steps": 1}, DPO_TRL)
    project = load_project(config, {"stage_labels.kind": "reserved"})
    data = project.run_dir / "data" / "elsie"
    for name in ("sft_train.jsonl", "sft_test.jsonl"):  # the rows as curate writes them for this kind
        text = json.dumps(read_jsonl(data / name))
        rows = json.loads(text.replace("<TIME-II>", RESERVED[1]).replace("<TIME-I>", RESERVED[0]))
        write_jsonl(data / name, rows)
    info = sft.run(*SFTSettings.of_project(project), "elsie")
    vocab = json.loads((reserved_base / "config.json").read_text())["vocab_size"]
    assert info["label_kind"] == "reserved" and info["added_token_ids"] == []
    assert set(info["stage_tokens"]) == set(RESERVED[:2]) and max(info["stage_tokens"].values()) < vocab
    folder = project.run_dir / "models" / "elsie" / "sft"
    assert not json.loads((folder / "adapter_config.json").read_text()).get("modules_to_save")
    shutil.rmtree(project.run_dir / "models")
