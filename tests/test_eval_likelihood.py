"""Fidelity by likelihood: the real held-out passage against decoys and under every stage, scored by a real
tiny model and real LoRA adapters; the metrics' arithmetic on known NLLs; what is skipped and why."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from persllm.config import Project, load_project
from persllm.config.llm import LLMConfig
from persllm.config.stages import EvalSettings
from persllm.evaluate import likelihood
from persllm.evaluate.systems import (
    System,
    load_heldout_items,
    messages_for,
    plan_systems,
    retrieval_context,
)
from persllm.jsonl import write_jsonl
from tests.fake_openai import FakeOpenAI
from tests.test_eval_project import make_project

PASSAGES = {
    ("elsie", "keeper"): [
        "The lamp was lit at dusk and the oil held.",
        "Fog all day; the horn sounded every minute.",
        "Father's boat came in with the morning tide.",
        "I trimmed the wick twice before the storm.",
    ],
    ("elsie", "engineer"): [
        "The new engine turns the lens by clockwork.",
        "I measured the breakwater stones for the board.",
        "Steam pressure held at forty pounds all night.",
        "The drawings went to Leith by the mail coach.",
    ],
    ("jonah", "schoolmaster"): [
        "The boys recited their tables before the stove.",
        "Slates and chalk are dearer than last winter.",
        "Amos read the psalm aloud without a fault.",
        "School closes for the herring season.",
    ],
    ("jonah", "mayor"): [
        "The council voted the harbour wall funds.",
        "I signed the lighting order for the quay.",
        "The market tolls were read at the town hall.",
        "We opened the new bridge with a brass band.",
    ],
}


QUESTIONS = ["What did you see at dawn?", "Who came by?", "What worried you?", "What was done by noon?"]


def heldout_project(tmp_path: Path, model: Path, eval_cfg: dict[str, Any] | None = None) -> Project:
    """The eval test project with held-out question records for every passage above."""
    base = {"backend": "transformers", "model": str(model), "concurrency": 4}
    project = load_project(make_project(tmp_path, base, eval_cfg))
    for persona_id in project.personas:
        records = [
            {
                "id": f"{persona_id}-{stage}-{n}",
                "persona": persona_id,
                "stage": stage,
                "kind": "ordinary",
                "turns": [
                    {"role": "user", "content": f"{QUESTIONS[n]} ({stage})"},
                    {"role": "assistant", "analysis": "", "content": passage},
                ],
                "reply": {"source": "heldout"},
            }
            for (pid, stage), passages in PASSAGES.items()
            if pid == persona_id
            for n, passage in enumerate(passages)
        ]
        write_jsonl(project.layout.heldout_questions(persona_id), records)
    return project


def train_on_own_words(project: Project, model: Path, persona_id: str, steps: int = 250) -> Path:
    """An sft adapter that has seen this persona's passages under their own stage's prompt and label: a
    system that should find the real words likely, prefer them to decoys, and prefer their own stage."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    trained = plan_systems(*EvalSettings.of_project(project), ["prompt"])[0][0]
    trained.mode = "trained"
    texts = []
    for item in load_heldout_items(project.workspace, None):
        if item.persona == persona_id:
            messages = messages_for(trained, item)
            texts.append(
                tokenizer.apply_chat_template(
                    [*messages, {"role": "assistant", "content": item.reference}], tokenize=False
                )
            )
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        peft_model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = project.layout.model(persona_id, "sft")
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def score_heldout(project: Project, names: list[str]) -> tuple[list[System], dict[str, Any]]:
    """The systems ``names`` and their likelihood metrics on every held-out item of ``project``."""
    settings, workspace = EvalSettings.of_project(project)
    systems, skipped = plan_systems(settings, workspace, names)
    items = load_heldout_items(workspace, None)
    context = retrieval_context(settings, workspace)
    return systems, likelihood.run(settings, workspace, systems, items, context, {}, skipped)


@pytest.mark.slow
def test_a_model_that_knows_the_real_words_is_told_apart_from_one_that_does_not(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    project = heldout_project(tmp_path, tiny_model_dir)
    for persona_id in project.personas:
        train_on_own_words(project, tiny_model_dir, persona_id)
    _, result = score_heldout(project, ["prompt", "sft"])

    assert result["counts"]["items"] == 16
    assert result["counts"]["decoys"] == {"other_stage": 16, "other_persona": 16, "same_stage": 16}
    assert result["counts"]["passages_scored"] == 2 * 16 * (1 + 3 + 1)
    assert result["chance"]["pick_real"] == pytest.approx(0.25)
    assert result["chance"]["stage_wins"] == pytest.approx(0.5)
    prompt, sft = result["systems"]["prompt"], result["systems"]["sft"]
    for estimate in (*prompt.values(), *sft.values()):
        assert estimate["n"] == 16 and estimate["low"] <= estimate["value"] <= estimate["high"]
    # The adapter that learnt the words finds them far more likely, picks them, and places them in time.
    difference = result["differences"]["sft"]
    assert difference["heldout_nll"]["high"] < 0 and difference["heldout_nll"]["excludes_zero"]
    assert sft["pick_real"]["value"] >= 0.75 > prompt["pick_real"]["value"]
    assert sft["stage_wins"]["value"] >= 0.75
    assert sft["stage_margin"]["low"] > 0


@pytest.mark.slow
def test_the_eval_stage_writes_the_metrics_and_leads_the_summary_with_them(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from persllm.cli import app

    project = heldout_project(
        tmp_path,
        tiny_model_dir,
        {"params": {"temperature": 0.0, "max_tokens": 4}, "samples": 1, "robustness": {"enabled": False}},
    )
    train_on_own_words(project, tiny_model_dir, "elsie", steps=5)
    train_on_own_words(project, tiny_model_dir, "jonah", steps=5)
    done = CliRunner().invoke(app, ["eval", str(project.config_path), "--systems", "prompt,sft"])
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    first_table = next(
        i for i, line in enumerate(lines) if line.startswith("likelihood of the real held-out")
    )
    assert first_table < next(i for i, line in enumerate(lines) if line.startswith("held-out real words"))
    assert any(line.startswith("heldout_nll (lower better)") for line in lines)
    assert "16/160 passages scored" not in done.output  # progress goes to stderr, not the summary
    metrics = json.loads(project.layout.metrics.read_text(encoding="utf-8"))
    assert set(metrics["likelihood"]["systems"]) == {"prompt", "sft"}
    assert metrics["seconds"]["likelihood"] >= 0
    assert "annotator-written" in metrics["settings"]["skipped"]["persona elsie (annotator-golden)"]
    report = (project.layout.eval / "report.md").read_text(encoding="utf-8")
    assert "## Likelihood of the real words" in report and "| chance |" in report
    assert (project.layout.eval / "plots" / "likelihood.png").exists()


def test_what_cannot_be_scored_says_why(tmp_path: Path, tiny_model_dir: Path) -> None:
    project = heldout_project(
        tmp_path,
        tiny_model_dir,
        {
            "extra_systems": {
                "remote": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
            }
        },
    )
    settings, workspace = EvalSettings.of_project(project)
    systems, skipped = plan_systems(settings, workspace, ["prompt", "remote"])
    one_stage = [
        item
        for item in load_heldout_items(project.workspace, None)
        if item.stage in ("keeper", "schoolmaster")
    ]
    # Items of one stage per persona still get their other stages' prompts; a persona with one stage
    # has none, which the stage metrics leave empty.
    for persona in project.personas.values():
        persona.stages = persona.stages[:1]
    context = retrieval_context(settings, workspace)
    result = likelihood.run(settings, workspace, systems, one_stage, context, {}, skipped)
    assert "prompt log-probabilities" in skipped["remote (likelihood)"]
    assert "one stage" in skipped["stage discrimination"]
    assert list(result["systems"]) == ["prompt"]
    assert result["systems"]["prompt"]["stage_wins"]["value"] is None
    assert result["systems"]["prompt"]["heldout_nll"]["n"] == 8
    assert result["counts"]["decoys"]["other_stage"] == 0  # no other stage to draw a decoy from
    assert likelihood.run(settings, workspace, systems, [], context, {}, {}) == {}


def test_the_metrics_follow_from_the_nlls() -> None:
    values: dict[str, list[float | None]] = {name: [None] * 2 for name in likelihood.METRICS}
    likelihood.fill(
        values,
        0,
        {
            "real": 2.0,
            "other_stage": 2.5,
            "other_persona": 1.5,
            "same_stage": 3.0,
            "stage:b": 2.4,
            "stage:c": 1.8,
        },
    )
    likelihood.fill(values, 1, {"real": 1.0, "other_persona": 4.0})
    assert values["heldout_nll"] == [2.0, 1.0]
    assert values["pick_vs_other_stage"] == [1.0, None]
    assert values["pick_vs_other_persona"] == [0.0, 1.0]
    assert values["pick_real"] == [0.0, 1.0]
    assert values["stage_wins"] == [0.0, None]
    assert values["stage_margin"][0] == pytest.approx(0.1)
    summary = likelihood.summarise({"a": values, "b": values}, [], "a", 1000, 0)
    assert summary["differences"]["b"]["heldout_nll"]["value"] == 0.0
    assert summary["chance"]["pick_real"] is None  # no plans given: no chance level to claim
    assert np.isclose(summary["systems"]["a"]["pick_vs_other_persona"]["value"], 0.5)


def test_a_llamacpp_generation_backend_is_scored_through_transformers(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    project = heldout_project(tmp_path, tiny_model_dir)
    systems, _ = plan_systems(*EvalSettings.of_project(project), ["prompt"])
    systems[0].llm = LLMConfig(backend="llamacpp", model="bundled:smollm2")
    project.config.base_model.model = str(tiny_model_dir)
    backends: dict[str, Any] = {}
    score = likelihood.scorer_for(*EvalSettings.of_project(project), systems[0], backends, 16)
    assert not isinstance(score, str)
    (backend,) = backends.values()
    assert backend.cfg.backend == "transformers" and backend.cfg.model == str(tiny_model_dir)
    conversation = [{"role": "user", "content": "What happened today?"}]
    assert np.isfinite(score("elsie", [conversation], ["The lamp was lit."])).all()


def test_the_judge_is_first_measured_at_picking_the_real_passage(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A judge that knows every passage's question picks right whatever the order; one that always says
    "A" is near chance; one that answers garbage misses every item and is counted as unreadable."""
    import re

    from persllm.evaluate import judge as judging

    answers = {
        f"{QUESTIONS[n]} ({stage})": passage
        for (_, stage), passages in PASSAGES.items()
        for n, passage in enumerate(passages)
    }

    def knowing(body: dict[str, Any]) -> str:
        text = body["messages"][-1]["content"]
        question = text.split("Question:\n", 1)[1].split("\n", 1)[0]
        for letter, passage in re.findall(r"Passage ([A-H]):\n(.+)", text):
            if passage.strip() == answers[question]:
                return f"Passage {letter}."
        return "none"

    project = heldout_project(tmp_path, tiny_model_dir)
    items = load_heldout_items(project.workspace, None)
    plans = likelihood.plan(project.workspace, items, ["other_stage", "other_persona", "same_stage"], 7)
    personas = {f"{p.id}/{s.id}": (p.name, s.time) for p in project.personas.values() for s in p.stages}
    results = {}
    for name, reply in (("knowing", knowing), ("always A", "A"), ("garbage", "I cannot say.")):
        with FakeOpenAI(default_reply=reply) as server:
            cfg = LLMConfig(backend="openai", base_url=server.base_url, model="judge")
            results[name] = judging.validity(cfg, None, {"temperature": 0}, plans, personas, 1000, 7)
            assert len(server.requests) == 16
    assert results["knowing"]["accuracy"]["value"] == 1.0 and results["knowing"]["unreadable"] == 0
    assert results["knowing"]["chance"] == pytest.approx(0.25)
    assert results["always A"]["accuracy"]["high"] < 0.75  # position, not knowledge
    assert results["garbage"]["accuracy"]["value"] == 0.0 and results["garbage"]["unreadable"] == 16
    assert judging.parse_letter("Passage C.", 4) == 2 and judging.parse_letter("E", 4) is None


def test_the_evaluation_can_run_its_models_in_bfloat16(tmp_path: Path, tiny_model_dir: Path) -> None:
    from persllm.llm import TransformersBackend

    values = {}
    for dtype in ("float32", "bfloat16"):
        project = heldout_project(tmp_path / dtype, tiny_model_dir, {"dtype": dtype})
        systems, result = score_heldout(project, ["prompt"])
        assert systems[0].llm.dtype == dtype
        values[dtype] = result["systems"]["prompt"]["heldout_nll"]["value"]
        # Answers in another dtype differ a little: they never share cache rows with float32 ones.
        weights = TransformersBackend(systems[0].llm).cache_identity({})["weights"]
        assert (weights is not None and "bfloat16" in weights) == (dtype == "bfloat16")
    assert values["bfloat16"] == pytest.approx(values["float32"], abs=0.1)
    assert values["bfloat16"] != values["float32"]
