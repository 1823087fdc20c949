"""Robustness end to end: the tiny real model as persona and as user-emulator, a judge on the scripted
HTTP server that sometimes answers garbage, and an emulator that times out."""

import json
from pathlib import Path
from typing import Any

from persllm import evaluate
from persllm.config import load_project
from persllm.config.stages import EvalSettings
from persllm.evaluate.robustness import METRICS
from persllm.jsonl import read_jsonl
from tests.fake_openai import FakeOpenAI
from tests.test_eval_e2e import make_adapter, one_torch_thread  # noqa: F401  (fixture)
from tests.test_eval_project import make_project, write_heldout


def probe_judge(body: dict[str, Any]) -> str:
    text = body["messages"][-1]["content"]
    if "break character" in text:
        return "maybe, it depends"  # unreadable: the offline check stands in
    if "give up or reverse" in text:
        return "Yes."
    return "no"


def project_with(tmp_path: Path, model: Path, emulator: dict[str, Any], **robustness: Any) -> Any:
    base = {"backend": "transformers", "model": str(model), "concurrency": 8, "params": {"max_tokens": 10}}
    eval_cfg = {
        "systems": ["prompt", "sft"],
        "params": {"temperature": 0, "max_tokens": 10},
        "robustness": {
            "probes_per_stage": 1,
            "pressure_turns": 2,
            "conversations": 1,
            "conversation_turns": 2,
            "emulator": emulator,
            **robustness,
        },
    }
    project = load_project(make_project(tmp_path, base, eval_cfg))
    write_heldout(project, per_stage=1)
    for persona in project.personas.values():
        labels = [str(stage.label) for stage in persona.stages]
        make_adapter(model, project.run_dir / "models" / persona.id / "sft", labels, f"{persona.name} does.")
    return project


def test_every_robustness_metric_with_intervals_judge_fallback_and_report(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    emulator = {"backend": "transformers", "model": str(tiny_model_dir), "params": {"max_tokens": 8}}
    with FakeOpenAI(default_reply=probe_judge) as judge:
        project = project_with(tmp_path, tiny_model_dir, emulator)
        result = evaluate.run(
            *EvalSettings.of_project(project), judge=f"judge-model@{judge.base_url}", max_items=1
        )
        judged = [r["messages"][-1]["content"] for r in judge.requests]

    robust = result["robustness"]
    assert set(robust["systems"]) == {"prompt", "sft"}
    for system in ("prompt", "sft"):
        found = robust["systems"][system]
        assert found["errors"] == 0
        for name in METRICS:
            assert found["metrics"][name]["value"] is not None, (system, name)
        for name in ("leak_rate", "past_accuracy", "premise_rejection", "ooc_rate", "sycophancy_flip"):
            assert 0.0 <= found["metrics"][name]["value"] <= 1.0
            assert found["metrics"][name]["low"] is not None  # an interval, not a bare number
    assert (
        set(robust["differences"]) == {"sft"} and "excludes_zero" in robust["differences"]["sft"]["ooc_rate"]
    )
    # The judge replaced the offline checks where it answered: it never said a stance flipped.
    assert robust["systems"]["prompt"]["metrics"]["sycophancy_flip"]["value"] == 1.0
    assert any("break character" in text for text in judged)

    out = project.run_dir / "eval"
    records = read_jsonl(out / "robustness.jsonl")
    assert {r["kind"] for r in records} == {
        "boundary",
        "past",
        "premise",
        "pressure",
        "sycophancy",
        "conversation",
    }
    conversation = next(r for r in records if r["kind"] == "conversation" and r["system"] == "sft")
    assert [t["emulated"] for t in conversation["turns"]] == [False, False, True, True, False, False]
    assert conversation["turns"][0]["user"] == conversation["turns"][4]["user"]  # asked again at the end
    assert all(t["user"].strip() for t in conversation["turns"])
    syco = next(r for r in records if r["kind"] == "sycophancy")
    assert len(syco["turns"]) == 3 and len(syco["offline"]["flip"]) == 2
    assert json.loads((out / "metrics.json").read_text())["robustness"]["counts"]["pressure"] == 4
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Robustness (corpus-built probes)" in report and "sft - prompt" in report
    manifest = json.loads((project.run_dir / "manifest.json").read_text())["stages"]["eval"]
    assert manifest["judge"]["model"] == "judge-model" and manifest["judge_params"]["temperature"] == 0.0


def test_a_conversation_whose_emulator_times_out_is_recorded_and_the_rest_completes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with FakeOpenAI(latency=3.0, default_reply="Tell me more.") as slow:
        emulator = {"backend": "openai", "base_url": slow.base_url, "model": "emulator", "max_retries": 0}
        project = project_with(tmp_path, tiny_model_dir, emulator, turn_timeout_s=0.3)
        result = evaluate.run(*EvalSettings.of_project(project), systems=["prompt"], max_items=1)
    found = result["robustness"]["systems"]["prompt"]
    assert found["errors"] == 2  # one conversation per persona
    records = read_jsonl(project.run_dir / "eval" / "robustness.jsonl")
    failed = [r for r in records if r["error"]]
    assert {r["kind"] for r in failed} == {"conversation"}
    assert all("emulator turn 2: timed out" in r["error"] for r in failed)
    assert len(failed[0]["turns"]) == 2  # the opening questions were answered and kept
    assert found["metrics"]["ooc_rate"]["value"] is not None  # the other probes were measured
    assert (project.run_dir / "eval" / "metrics.json").exists()
