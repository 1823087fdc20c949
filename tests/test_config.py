"""Config loading: each user mistake is one line naming the file and key, via the API and the CLI."""

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from persllm.cli import main
from persllm.cli.app import load
from persllm.config import load_project
from persllm.errors import UserError

PERSONA = """\
id: ada
name: Ada Lovelace
stages:
  - id: young
    time: It is 1833, in London.
    knowledge: ["../corpus/young/*.md"]
    style: ["../corpus/young/*.txt"]
  - id: older
    time: It is 1843, in London.
    inherits: true
    style: ["../corpus/older/*.txt"]
"""


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A valid two-stage project; tests break one thing in it."""
    for name, text in {
        "corpus/young/bio.md": "Ada was born in 1815.\n",
        "corpus/young/letters.txt": "Dear Mother, I am well.\n",
        "corpus/older/notes.txt": "The engine weaves algebraic patterns.\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "ada.yaml").write_text(PERSONA, encoding="utf-8")
    config = tmp_path / "persllm.yaml"
    config.write_text("project: demo\npersonas: [personas/ada.yaml]\nseed: 7\n", encoding="utf-8")
    return config


def edit(relative: str, transform: Callable[[str], str]) -> Callable[[Path], None]:
    def apply(config: Path) -> None:
        path = config.parent / relative
        path.write_text(transform(path.read_text(encoding="utf-8")), encoding="utf-8")

    return apply


def add_persona(config: Path) -> None:
    (config.parent / "personas" / "twin.yaml").write_text(PERSONA, encoding="utf-8")
    edit("persllm.yaml", lambda t: t.replace("[personas/ada.yaml]", "['personas/*.yaml']"))(config)


CASES = {
    "unknown top-level key": (
        edit("persllm.yaml", lambda t: t + "projct: x\n"),
        r"persllm.yaml: projct: unknown key; remove it or fix the spelling \(allowed here: .*project",
    ),
    "unknown nested key": (
        edit("persllm.yaml", lambda t: t + "embedder:\n  modle: x\n"),
        r"persllm.yaml: embedder.modle: unknown key.*allowed here: batch_size, device, model",
    ),
    "unknown key in a persona stage": (
        edit("personas/ada.yaml", lambda t: t.replace("inherits: true", "inherit: true")),
        r"ada.yaml: stages\[1\].inherit: unknown key",
    ),
    "missing persona file": (
        edit("persllm.yaml", lambda t: t.replace("personas/ada.yaml", "personas/bob.yaml")),
        r"persllm.yaml: personas\[0\]: no file matches 'personas/bob.yaml'",
    ),
    "empty stages": (
        edit("personas/ada.yaml", lambda t: t.split("stages:")[0] + "stages: []\n"),
        r"ada.yaml: stages: a persona needs at least one stage",
    ),
    "stage with no files": (
        edit("personas/ada.yaml", lambda t: t.replace('    style: ["../corpus/older/*.txt"]\n', "")),
        r"ada.yaml: stages\[1\] \(older\): no knowledge, style or dialogue files; add at least one glob",
    ),
    "duplicate persona ids": (add_persona, r"twin.yaml: id: persona id 'ada' is also used by .*ada.yaml"),
    "duplicate stage ids": (
        edit("personas/ada.yaml", lambda t: t.replace("id: older", "id: young")),
        r"ada.yaml: stages: stage id 'young' appears twice; give each stage its own id$",
    ),
    "glob matching nothing": (
        edit("personas/ada.yaml", lambda t: t.replace("older/*.txt", "older/*.rst")),
        r"ada.yaml: stages\[1\].style\[0\]: '../corpus/older/\*.rst' matches no file",
    ),
    "malformed glob": (
        edit("personas/ada.yaml", lambda t: t.replace("older/*.txt", "older/[*.txt")),
        r"ada.yaml: stages\[1\].style\[0\]: '../corpus/older/\[\*.txt' is not a valid glob",
    ),
    "wrong type": (
        edit("persllm.yaml", lambda t: t.replace("seed: 7", "seed: abc")),
        r"persllm.yaml: seed: .*valid integer.*\(got \"abc\"\); fix the value",
    ),
    "wrong type nested": (
        edit("persllm.yaml", lambda t: t + "retrieval:\n  style_words: [1]\n"),
        r"persllm.yaml: retrieval.style_words: .*valid integer",
    ),
    "bad yaml": (
        edit("persllm.yaml", lambda t: t + "corpus: {max_words: 5\n"),
        r"persllm.yaml:\d+: .*; fix the YAML syntax",
    ),
    "missing required key": (
        edit("persllm.yaml", lambda t: t.replace("project: demo\n", "")),
        r"persllm.yaml: project: required key is missing; add it",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_through_load_project(project: Path, case: str) -> None:
    mutate, pattern = CASES[case]
    mutate(project)
    with pytest.raises(UserError) as caught:
        load_project(project)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_through_cli_is_one_line_exit_2(
    project: Path, case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, pattern = CASES[case]
    mutate(project)
    monkeypatch.setattr(sys, "argv", ["persllm", "index", str(project)])
    with pytest.raises(SystemExit) as caught:
        main()
    out, err = capsys.readouterr()
    assert caught.value.code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


def test_valid_project_loads(project: Path) -> None:
    loaded = load_project(project.parent)  # the folder works as well as the file
    ada = loaded.persona("ada")
    assert [stage.label for stage in ada.stages] == ["<TIME-I>", "<TIME-II>"]
    assert ada.stages[1].inherits and not ada.stages[0].inherits
    assert loaded.run_dir == project.parent.resolve() / "runs" / "demo"
    assert [p.name for p in loaded.workspace.stage_files("ada", "young", "knowledge")] == ["bio.md"]
    assert loaded.workspace.stage_files("ada", "older", "knowledge") == []


def test_precedence_defaults_then_yaml_then_set(project: Path) -> None:
    defaults = load_project(project)
    assert defaults.config.retrieval.knowledge_words == 1500  # default, not in the YAML
    assert defaults.config.seed == 7  # YAML beats the default 42
    overridden = load(str(project), ["seed=9", "retrieval.knowledge_words=300", "embedder.device=cpu"])
    assert overridden.config.seed == 9
    assert overridden.config.retrieval.knowledge_words == 300
    assert overridden.config.embedder.model == "bundled:minilm"
    # A dedicated flag beats --set.
    flagged = load(str(project), ["seed=9"], seed=11)
    assert flagged.config.seed == 11


def test_preset_sits_between_yaml_and_set(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(
        "persllm.yaml",
        lambda t: (
            t + "presets:\n  big: {seed: 8, retrieval.style_words: 900, annotate.counts: {ordinary: 9}}\n"
        ),
    )(project)
    big = load(str(project), [], preset="big")
    assert (big.config.seed, big.config.retrieval.style_words) == (8, 900)
    assert big.config.annotate.counts.ordinary == 9
    assert load(str(project), ["seed=5"], preset="big").config.seed == 5  # --set beats the preset
    assert load(str(project)).config.seed == 7  # a preset applies only when named
    monkeypatch.setattr(sys, "argv", ["persllm", "run", str(project), "--preset", "huge"])
    with pytest.raises(SystemExit) as caught:
        main()
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {project}: presets: no preset 'huge' (known: big); add it or fix the name"
    )


def test_demo_presets_are_valid() -> None:
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo" / "persllm.yaml"
    default, large = load_project(demo), load_project(demo, preset="large")
    assert large.config.annotate.counts.ordinary > 2 * default.config.annotate.counts.ordinary
    assert set(large.config.eval.systems) == {"prompt", "rag", "sft", "sft+dpo"}
    assert large.config.sft.trl["num_train_epochs"] > default.config.sft.trl["num_train_epochs"]


def test_bad_set_option_is_a_user_error(project: Path) -> None:
    with pytest.raises(UserError, match=r"--set 'seed': expected KEY=VALUE"):
        load(str(project), ["seed"])
    with pytest.raises(UserError, match=r"seed: .*valid integer"):
        load(str(project), ["seed=abc"])
    with pytest.raises(UserError, match=r"retrieval.budget: unknown key"):
        load(str(project), ["retrieval.budget=3"])


def test_missing_project_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nothing.yaml: file not found; .*persllm init DIR"):
        load_project(tmp_path / "nothing.yaml")
