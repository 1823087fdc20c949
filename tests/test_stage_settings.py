"""Each stage reads only the settings it declares: its ``run`` takes them and the workspace, never the
whole project, and ``persllm run`` fingerprints exactly what the declaration names."""

import ast
import inspect
from dataclasses import fields
from pathlib import Path

import pytest

import persllm
from persllm import annotate, curate, evaluate, index, pairs, pipeline
from persllm.config import ProjectConfig, Workspace, load_project
from persllm.config.stages import SFTSettings, StageSettings
from persllm.train import dpo, sft

ENTRIES = {
    "index": index.run,
    "annotate": annotate.run,
    "curate": curate.run,
    "pairs": pairs.run,
    "sft": sft.run,
    "dpo": dpo.run,
    "eval": evaluate.run,
}
# The stages' own code: no function in it may take the whole project.
STAGE_CODE = ["index", "annotate", "curate", "pairs", "train/sft.py", "train/dpo.py", "train/common.py"]
STAGE_CODE += [f"evaluate/{name}.py" for name in ("run", "systems", "likelihood", "robustness", "scores")]
# Helpers that commands (chat, retrieve, train's pre-flight check) call with a loaded project.
FOR_COMMANDS = {"index/retrieve.py:of(project)", "train/common.py:validate_trl_blocks(project)"}


def test_every_stage_run_takes_its_settings_and_the_workspace() -> None:
    for name, run in ENTRIES.items():
        first, second = list(inspect.signature(run).parameters.values())[:2]
        assert first.annotation is pipeline.SETTINGS[name], name
        assert second.annotation is Workspace, name


def test_no_function_of_a_stage_takes_the_project() -> None:
    root = Path(persllm.__file__).parent
    files: list[Path] = []
    for entry in STAGE_CODE:
        path = root / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    taking = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for arg in node.args.args + node.args.kwonlyargs:
                    if arg.annotation is not None and ast.unparse(arg.annotation).strip("'\"") == "Project":
                        taking.append(f"{path.relative_to(root)}:{node.name}({arg.arg})")
    assert set(taking) == FOR_COMMANDS


def test_settings_name_sections_of_the_project_file() -> None:
    sections = set(ProjectConfig.model_fields)
    dumped = ProjectConfig(project="p", personas=["x.yaml"]).model_dump(mode="json")
    for name, kind in pipeline.SETTINGS.items():
        assert issubclass(kind, StageSettings)
        assert {f.name for f in fields(kind)} <= sections, name
        for key in kind.config_keys():
            pipeline.config_value(dumped, key)  # every key reaches a value
    assert SFTSettings.config_keys()[-3:] == ["base_model.model", "base_model.device", "base_model.dtype"]


@pytest.mark.parametrize(
    ("key", "value", "changed"),
    [
        ("eval.samples", 3, {"eval"}),
        ("corpus.max_words", 90, {"index", "eval"}),
        ("curate.system_prompt", "brief", {"curate", "pairs", "sft", "dpo", "eval"}),
        ("annotate.max_attempts", 5, {"annotate", "pairs", "eval"}),
        ("base_model.concurrency", 16, {"pairs", "eval"}),
        ("serve.port", 9999, set()),
    ],
)
def test_a_setting_re_runs_the_stages_that_declare_it(
    tmp_path: Path, key: str, value: object, changed: set[str]
) -> None:
    (tmp_path / "s.txt").write_text("Some words of the person.\n", encoding="utf-8")
    (tmp_path / "p.yaml").write_text(
        "id: p\nname: P\nstages:\n  - id: s\n    time: once\n    style: [s.txt]\n", encoding="utf-8"
    )
    config = tmp_path / "persllm.yaml"
    config.write_text("project: t\npersonas: [p.yaml]\n", encoding="utf-8")
    before, after = load_project(config), load_project(config, {key: value})
    moved = {
        stage.name
        for stage in pipeline.STAGES
        if pipeline.fingerprint(before, stage) != pipeline.fingerprint(after, stage)
    }
    assert moved == changed
