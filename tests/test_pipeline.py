"""``persllm run`` end to end on a tiny model: every stage runs, a second run skips them all, a changed
annotation setting re-runs from annotate onward and nothing before, and an interrupted run resumes."""

import itertools
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from persllm import pipeline
from persllm.cli.app import app
from persllm.cli.run import headline
from persllm.config import load_project
from persllm.errors import UserError
from persllm.jsonl import read_jsonl
from persllm.manifest import load_manifest
from persllm.prompting import system_prompt
from persllm.train.common import system_style
from tests.fake_openai import FakeOpenAI
from tests.test_eval_project import make_project

pytestmark = pytest.mark.slow  # whole pipeline runs on the tiny model: `make test-fast` skips it

QUESTION_NUMBER = itertools.count()
STAGES = ["index", "annotate", "curate", "pairs", "sft", "dpo", "eval"]


def scripted_annotator(body: dict[str, Any]) -> str:
    """Answer the annotation prompts: a delimited CoT reply when asked for one, else a user message."""
    prompt = body["messages"][-1]["content"]
    if "ANALYSIS:" in prompt and "RESPONSE:" in prompt:
        if "1905" in prompt or "mayor" in prompt or "engineer" in prompt:
            return (
                "ANALYSIS: The user asks about the later years; the record tells of the council.\n"
                "RESPONSE: In these later years I argue in the council chamber and I count every penny twice."
            )
        return (
            "ANALYSIS: The user asks about the early years; the record speaks of the lamp and the school.\n"
            "RESPONSE: In these early years I keep to my work at dawn, and I will not be flattered about it."
        )
    # A different question on every call, as a sampling annotator would write (the call cache keeps
    # re-runs identical).
    return f"What do you make of the harbour, question number {next(QUESTION_NUMBER)}?"


def write_config(path: Path, base_model: Path, fake_url: str, ordinary: int = 2) -> None:
    config = yaml.safe_load(path.read_text())
    config.update(
        {
            "seed": 3,
            "annotator": {
                "backend": "openai",
                "model": "fake-model",
                "base_url": fake_url,
                "structured_output": "off",
                "concurrency": 4,
                "max_retries": 1,
            },
            "annotate": {
                "counts": {"ordinary": ordinary, "misleading": 1, "opinion": 1},
                "multi_turn_share": 0.0,
            },
            "curate": {
                "min_response_words": 3,
                "min_analysis_words": 1,
                "test_fraction": 0.25,
                "system_prompt": "brief",
                # These tests are about run state, not the scripted annotator's grounding.
                "annotator_min_kept": 0.0,
                "grounding_min": -1.0,
            },
            "pairs": {"min_difference": 0.05},
            "base_model": {"backend": "transformers", "model": str(base_model), "params": {"max_tokens": 12}},
            "sft": {"trl": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3}},
            "dpo": {"trl": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-4}},
            "eval": {"systems": ["prompt", "sft", "sft+dpo"], "samples": 1, "params": {"max_tokens": 12}},
        }
    )
    path.write_text(yaml.safe_dump(config))


@pytest.fixture()
def pipeline_project(tmp_path: Path, tiny_model_dir: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    return make_project(tmp_path / "project", {"backend": "transformers", "model": str(base)})


def statuses(results: list[pipeline.StageResult]) -> dict[str, str]:
    return {result.name: result.status for result in results}


def test_run_then_skip_then_rerun_from_annotate(pipeline_project: Path, tmp_path: Path) -> None:
    with FakeOpenAI(default_reply=scripted_annotator) as server:
        write_config(pipeline_project, tmp_path / "base", server.base_url)
        project = load_project(pipeline_project)

        first = pipeline.run(project)
        assert statuses(first) == dict.fromkeys(STAGES, "ran")
        run_dir = project.run_dir
        assert len(read_jsonl(run_dir / "annotations" / "elsie.jsonl")) == 2 * 4
        for persona in ("elsie", "jonah"):
            assert read_jsonl(run_dir / "data" / persona / "sft_train.jsonl")
            assert read_jsonl(run_dir / "data" / persona / "dpo_train.jsonl")
            assert (run_dir / "models" / persona / "sft" / "adapter_config.json").exists()
            assert (run_dir / "models" / persona / "dpo" / "adapter_config.json").exists()
        assert (run_dir / "eval" / "metrics.json").exists()
        # curate.system_prompt: brief reaches the SFT rows, the DPO prompts, the models and evaluation,
        # where the baseline keeps the full prompt (profile included) on the same items.
        elsie = project.persona("elsie")
        rows = read_jsonl(run_dir / "data" / "elsie" / "sft_train.jsonl")
        assert rows and all(
            row["messages"][0]["content"] == system_prompt(elsie, row["meta"]["stage"], "brief")
            for row in rows
        )
        pairs = read_jsonl(run_dir / "data" / "elsie" / "dpo_train.jsonl")
        assert pairs and {p["prompt"][0]["content"] for p in pairs} <= {
            system_prompt(elsie, s, "brief") for s in elsie.stages
        }
        for variant in ("sft", "dpo"):
            assert system_style(run_dir / "models" / "elsie" / variant) == "brief"
        generations = read_jsonl(run_dir / "eval" / "generations.jsonl")
        prompt_tokens = {(g["system"], g["item"]): g["prompt_tokens"] for g in generations}
        for (name, item), tokens in prompt_tokens.items():
            if name != "prompt":
                assert tokens < prompt_tokens[("prompt", item)] - 20
        manifest = load_manifest(run_dir)
        assert all(manifest["pipeline"][name]["status"] == "done" for name in STAGES)
        summary = {line.split()[0]: line for line in pipeline.format_summary(first).splitlines()}
        assert "models=2 steps=6 train_loss=" in summary["sft"]  # max_steps 3, two personas
        assert "models=2 steps=4 " in summary["dpo"]
        assert "systems=3" in summary["eval"] and "definitions" not in manifest["pipeline"]["eval"]["counts"]
        table = headline(run_dir / "eval").splitlines()
        assert table[0] == f"report: {run_dir / 'eval' / 'report.html'}"
        # No held-out own words in this small corpus: only the annotator-golden set, metrics as rows.
        assert table[2].startswith("annotator-golden (the paper's setting): ")
        assert table[3].split() == ["metric", "prompt", "sft", "sft+dpo", "sft+dpo", "-", "prompt"]
        end = table.index("", 4)  # the robustness probes' table follows after a blank line
        rows = {line.split()[0]: line for line in table[4:end]}
        assert {"bleu", "rouge_l", "style_fidelity", "persona_acc"} <= set(rows)
        assert table[end + 1].startswith("robustness: ") and "probes per system" in table[end + 1]
        robust = {line.split()[0]: line for line in table[end + 3 :]}
        assert {"leak_rate", "ooc_rate", "turn_consistency"} <= set(robust)
        # Each cell is a value with its interval; the last is the signed difference to the baseline.
        assert re.search(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]( \*)?$", rows["rouge_l"])
        requests_after_first = len(server.requests)

        # Nothing changed: every stage is skipped and no model is called.
        second = pipeline.run(load_project(pipeline_project))
        assert statuses(second) == dict.fromkeys(STAGES, "skipped")
        assert len(server.requests) == requests_after_first

        # One annotation setting changed: annotate onward re-runs, index does not.
        write_config(pipeline_project, tmp_path / "base", server.base_url, ordinary=3)
        third = pipeline.run(load_project(pipeline_project))
        assert statuses(third)["index"] == "skipped"
        assert statuses(third) == {"index": "skipped", **dict.fromkeys(STAGES[1:], "ran")}
        assert len(read_jsonl(run_dir / "annotations" / "elsie.jsonl")) == 2 * 5
        # The earlier annotations were kept aside, not deleted.
        assert list((run_dir / "stale").glob("annotate-*/annotations/elsie.jsonl"))


def test_interrupted_run_resumes(
    pipeline_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAI(default_reply=scripted_annotator) as server:
        write_config(pipeline_project, tmp_path / "base", server.base_url)
        project = load_project(pipeline_project)
        real_curate = pipeline.STAGES[2].run

        def interrupted(settings: Any, workspace: Any, resume: bool) -> dict[str, Any]:
            raise KeyboardInterrupt

        monkeypatch.setattr(pipeline.STAGES[2], "run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(project, stop="curate")
        assert load_manifest(project.run_dir)["pipeline"]["curate"]["status"] == "interrupted"

        monkeypatch.setattr(pipeline.STAGES[2], "run", real_curate)
        calls = len(server.requests)
        resumed = pipeline.run(load_project(pipeline_project), stop="curate")
        assert statuses(resumed) == {"index": "skipped", "annotate": "skipped", "curate": "resumed"}
        assert len(server.requests) == calls


def test_stage_selection_errors() -> None:
    with pytest.raises(UserError, match="unknown stage"):
        pipeline.select("annotat", None)
    with pytest.raises(UserError, match="comes after"):
        pipeline.select("eval", "index")
    assert [s.name for s in pipeline.select("curate", "sft")] == ["curate", "pairs", "sft"]


def test_run_cli_help_and_bad_stage(pipeline_project: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output
    result = runner.invoke(app, ["run", str(pipeline_project), "--from", "nope"])
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError)


def test_training_fingerprints_ignore_the_generation_backend(tmp_path: Path) -> None:
    """Switching base_model.backend to llamacpp (generation only) keeps the trained models current;
    another base model retrains them."""
    config = make_project(tmp_path, {"backend": "transformers", "model": "bundled:smollm2"})
    stages = {stage.name: stage for stage in pipeline.STAGES}
    before = load_project(config)
    on_llamacpp = load_project(config, {"base_model.backend": "llamacpp", "base_model.concurrency": 16})
    other = load_project(config, {"base_model.model": "other/model"})
    for name in ("sft", "dpo"):
        assert pipeline.fingerprint(before, stages[name]) == pipeline.fingerprint(on_llamacpp, stages[name])
        assert pipeline.fingerprint(before, stages[name]) != pipeline.fingerprint(other, stages[name])
    assert pipeline.fingerprint(before, stages["eval"]) != pipeline.fingerprint(on_llamacpp, stages["eval"])
