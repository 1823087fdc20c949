"""``persllm init``, ``index`` and ``retrieve`` end to end, as a new user runs them on the starter project."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from persllm.cli import main  # importing the package registers the commands
from persllm.cli.app import app

PERSLLM = Path(sys.executable).parent / "persllm"
runner = CliRunner()


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``persllm ARGS`` in-process through the real entry point (user errors -> exit 2)."""
    capsys.readouterr()
    saved = sys.argv
    sys.argv = ["persllm", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["init", "index", "retrieve"])
def test_help_ends_with_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example: persllm " + command in result.output
    registered = next(c for c in app.registered_commands if c.callback and c.callback.__name__ == command)
    assert registered.callback is not None and registered.callback.__doc__ is not None
    assert (
        registered.callback.__doc__.strip().splitlines()[-1].strip().startswith(f"Example: persllm {command}")
    )


def test_init_index_retrieve_as_a_new_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "my-persona"
    code, out, err = run_main(["init", str(target)], capsys)
    assert code == 0, err
    config = target / "persllm.yaml"
    assert config.is_file() and (target / "personas" / "wren.yaml").is_file()
    assert any((target / "corpus").rglob("*.txt"))
    assert f"persllm index {config}" in out and "persllm retrieve" in out and "--stage keeper" in out

    code, out, err = run_main(["index", str(config)], capsys)
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert header.split() == [
        "persona", "stage", "chunks", "knowledge", "style", "heldout", "exchanges", "heldout_ex", "embedded",
        "reused",
    ]  # fmt: skip
    keeper = next(row.split() for row in rows if row.split()[:2] == ["wren", "keeper"])
    assert int(keeper[2]) > 0 and int(keeper[8]) == int(keeper[2]) and keeper[9] == "0"
    assert "wren: trains on up to 12 own-words dialogues, 0 real exchanges and 0 annotator-written" in out
    assert (target / "runs" / "my-persona").is_dir()  # the project is named after its folder
    assert (target / "runs" / "my-persona" / "index" / "wren" / "keeper" / "embeddings.npy").is_file()

    code, out, _ = run_main(["index", str(target), "--persona", "wren"], capsys)
    total = next(row.split() for row in out.splitlines() if row.startswith("total"))
    assert code == 0 and total[7] == "0" and total[8] == total[1]  # nothing embedded again

    query = "Who taught you to keep the light?"
    code, out, err = run_main(
        ["retrieve", str(config), query, "--persona", "wren", "--stage", "keeper"], capsys
    )
    assert code == 0, err
    assert out.startswith("== knowledge: ") and "== style: " in out
    assert "[corpus/wren/keeper/" in out and "corpus/wren/engineer/" not in out

    args = [
        "retrieve",
        str(config),
        query,
        "--stage",
        "keeper",
        "--json",
        "--set",
        "retrieval.style_words=60",
    ]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["persona"] == "wren" and data["stage"] == "keeper" and data["query"] == query
    assert data["knowledge"] and 0 < data["style_words"] <= 60
    assert all(piece["ref"].startswith("corpus/wren/keeper/") for piece in data["knowledge"] + data["style"])

    seed = data["style"][-1]["ref"]
    code, out, err = run_main([*args, "--seed", seed], capsys)
    seeded = json.loads(out)
    assert code == 0 and seeded["style"][0]["ref"] == seed and seeded["seed"] == data["style"][-1]["id"]


def test_init_refuses_a_non_empty_folder_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("mine", encoding="utf-8")
    code, out, err = run_main(["init", str(target)], capsys)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"error: {target}: folder is not empty; choose a new folder, or pass --force to write the "
        "starter files into it (same-named files are overwritten)"
    )
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    code, _, err = run_main(["init", str(target), "--force"], capsys)
    assert code == 0, err
    assert (target / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (target / "persllm.yaml").is_file()


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "p"
    assert run_main(["init", str(target)], capsys)[0] == 0
    config = str(target / "persllm.yaml")
    cases = [
        (["retrieve", config, "q", "--stage", "keeper"], r"no index for wren/keeper; run `persllm index "),
        (["retrieve", config, "q", "--stage", "sailor"], "persona 'wren' has no stage 'sailor'"),
        (["index", config, "--persona", "nobody"], "no persona 'nobody'"),
        (["index", config, "--set", "corpus.max_words=3"], "corpus.max_words: Input should be greater than"),
        (["index", str(tmp_path / "missing.yaml")], "missing.yaml: file not found"),
    ]
    for args, expected in cases:
        code, out, err = run_main(args, capsys)
        assert code == 2 and out == "", (args, out)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def persllm(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``persllm`` script in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [str(PERSLLM), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False
    )


def test_real_executable_init_and_error_without_traceback(tmp_path: Path) -> None:
    first = persllm(tmp_path, "init", "proj")
    assert first.returncode == 0 and "persllm index proj/persllm.yaml" in first.stdout
    again = persllm(tmp_path, "init", "proj")
    assert again.returncode == 2 and again.stdout == "" and "Traceback" not in again.stderr
    assert again.stderr.splitlines() == [
        "error: proj: folder is not empty; choose a new folder, or pass --force "
        "to write the starter files into it (same-named files are overwritten)"
    ]


@pytest.mark.slow
def test_real_executable_index_and_retrieve_json(tmp_path: Path) -> None:
    """Two fresh processes each load the encoder: slow on a busy CPU."""
    assert persllm(tmp_path, "init", "proj").returncode == 0
    assert persllm(tmp_path, "index", "proj/persllm.yaml").returncode == 0
    result = persllm(
        tmp_path, "retrieve", "proj", "What did your father teach you?", "--stage", "engineer", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["stage"] == "engineer" and data["knowledge"][0]["ref"].startswith("corpus/wren/engineer/")
