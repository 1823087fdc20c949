"""A small two-persona project with held-out data for the evaluation tests, and the tests of how items
are read, which systems run, and how each system is prompted."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from persllm.config import Project, load_project
from persllm.config.stages import EvalSettings
from persllm.curate.format import sft_row
from persllm.errors import UserError
from persllm.evaluate.systems import Item, System, load_items, messages_for, plan_systems
from persllm.jsonl import write_jsonl

CORPUS = {
    ("elsie", "keeper"): (
        "Elsie Wren keeps the oil lamp at Skerrow Point. She trims the wick at dusk and logs the weather.",
        "I keep the light. The sea does not forgive vanity, and neither do I.",
    ),
    ("elsie", "engineer"): (
        "In 1902 Elsie became Resident Engineer and drew the plans for the breakwater in concrete.",
        "A breakwater is arithmetic. Give me the soundings and I will give you a wall.",
    ),
    ("jonah", "schoolmaster"): (
        "Jonah Pell teaches forty children to read in the schoolroom at Carrow Bay.",
        "Patience is the mother of learning. Festina lente, children.",
    ),
    ("jonah", "mayor"): (
        "In 1905 Jonah Pell is mayor of Carrow Bay and opposes the breakwater loan in the council.",
        "Debt is a thief that comes by daylight. The town shall pay as it goes.",
    ),
}
QUESTIONS = ["Who keeps the light?", "What do you teach?", "Is the sea kind?", "What about the breakwater?"]
PERSONALITY = {"elsie": {"O": 3.0, "C": 5.0, "E": 2.0, "A": 2.5, "N": 2.0}, "jonah": None}


def make_project(root: Path, base_model: dict[str, Any], eval_cfg: dict[str, Any] | None = None) -> Path:
    """Write the project files (config, personas, corpus) under ``root``; returns persllm.yaml."""
    for persona in ("elsie", "jonah"):
        stages = []
        for (pid, stage), (knowledge, style) in CORPUS.items():
            if pid != persona:
                continue
            folder = root / "corpus" / pid / stage
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "knowledge.md").write_text(knowledge + "\n", encoding="utf-8")
            (folder / "style.txt").write_text(style + "\n", encoding="utf-8")
            stages.append(
                {
                    "id": stage,
                    "time": f"It is the {stage} years.",
                    "knowledge": [f"../corpus/{pid}/{stage}/*.md"],
                    "style": [f"../corpus/{pid}/{stage}/*.txt"],
                }
            )
        spec: dict[str, Any] = {
            "id": persona,
            "name": persona.title(),
            "profile": f"{persona} of Carrow Bay.",
        }
        spec["stages"] = stages
        if PERSONALITY[persona]:
            spec["personality"] = PERSONALITY[persona]
        (root / "personas").mkdir(parents=True, exist_ok=True)
        (root / "personas" / f"{persona}.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    config = {
        "project": "evaltest",
        "personas": ["personas/*.yaml"],
        "base_model": base_model,
        # The robustness probes have their own tests (test_eval_robustness.py); elsewhere they are off.
        "eval": {"robustness": {"enabled": False}, **(eval_cfg or {})},
    }
    path = root / "persllm.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def write_heldout(project: Project, per_stage: int = 2, without_context: int = 0) -> int:
    """Annotation records and ``sft_test.jsonl`` rows in the curated format; returns the item count.

    The last ``without_context`` records of each persona are left out of the annotation file, so rag
    has to re-retrieve their context.
    """
    count = 0
    for persona_id, persona in project.personas.items():
        records = []
        for stage in persona.stages:
            knowledge, style = CORPUS[(persona_id, stage.id)]
            for n in range(per_stage):
                records.append(
                    {
                        "id": f"{persona_id}-{stage.id}-{n}",
                        "persona": persona_id,
                        "stage": stage.id,
                        "kind": "misleading" if n % 2 else "ordinary",
                        "turns": [
                            {"role": "user", "content": QUESTIONS[(count + n) % len(QUESTIONS)]},
                            {"role": "assistant", "analysis": f"Recall: {knowledge}", "content": style},
                        ],
                        "context": {"knowledge": f"[k] {knowledge}", "style": f"[s] {style}"},
                    }
                )
        rows = [sft_row(record, persona, "inline") for record in records]
        kept = records[: len(records) - without_context]
        write_jsonl(project.run_dir / "annotations" / f"{persona_id}.jsonl", kept)
        write_jsonl(project.run_dir / "data" / persona_id / "sft_test.jsonl", rows)
        count += len(rows)
    return count


@pytest.fixture()
def project(tmp_path: Path) -> Project:
    path = make_project(tmp_path, {"backend": "transformers", "model": str(tmp_path / "no-model")})
    loaded = load_project(path)
    write_heldout(loaded)
    return loaded


# --------------------------------------------------------------------------- items


def test_items_are_first_exchanges_without_label_or_analysis(project: Project) -> None:
    items = load_items(*EvalSettings.of_project(project), None)
    assert len(items) == 8
    first = items[0]
    assert (first.persona, first.stage, first.kind, first.label) == (
        "elsie",
        "keeper",
        "ordinary",
        "<TIME-I>",
    )
    assert first.question == "Who keeps the light?"  # the label token is not part of the question
    assert first.reference == CORPUS[("elsie", "keeper")][1]  # the <think> analysis is split off
    assert "Elsie" in first.system and "keeper years" in first.system
    assert first.context == {
        "knowledge": f"[k] {CORPUS[('elsie', 'keeper')][0]}",
        "style": f"[s] {first.reference}",
    }


def test_max_items_caps_each_persona_and_stage(project: Project) -> None:
    items = load_items(*EvalSettings.of_project(project), 1)
    assert [(i.persona, i.stage) for i in items] == [
        ("elsie", "keeper"),
        ("elsie", "engineer"),
        ("jonah", "schoolmaster"),
        ("jonah", "mayor"),
    ]


def test_a_malformed_row_is_a_user_error_naming_the_line(project: Project) -> None:
    path = project.run_dir / "data" / "jonah" / "sft_test.jsonl"
    write_jsonl(path, [{"messages": [{"role": "user", "content": "hi"}], "meta": {}}])
    with pytest.raises(UserError, match=r"sft_test.jsonl:1: expected messages"):
        load_items(*EvalSettings.of_project(project), None)


# --------------------------------------------------------------------------- systems and prompts


def test_missing_models_skip_their_system_with_a_note(project: Project) -> None:
    planned, skipped = plan_systems(*EvalSettings.of_project(project), ["prompt", "rag", "sft", "sft+dpo"])
    assert [s.name for s in planned] == ["prompt", "rag"]
    assert set(skipped) == {"sft", "sft+dpo"}
    assert "models/elsie/sft" in skipped["sft"] and "persllm train" in skipped["sft"]


def test_an_unknown_system_is_a_user_error(project: Project) -> None:
    with pytest.raises(UserError, match=r"eval.systems: unknown system 'gpt5'; use one of: prompt, rag"):
        plan_systems(*EvalSettings.of_project(project), ["gpt5"])


def test_each_system_is_prompted_its_own_way(project: Project) -> None:
    item = load_items(*EvalSettings.of_project(project), None)[0]
    base = project.config.base_model
    prompt = messages_for(System("prompt", base, "prompt"), item)
    assert prompt == [{"role": "system", "content": item.system}, {"role": "user", "content": item.question}]
    trained = messages_for(System("sft", base, "trained"), item)
    assert trained[1]["content"] == "<TIME-I> Who keeps the light?" and trained[0] == prompt[0]
    # A model trained on brief prompts gets the brief prompt; the baseline keeps the profile.
    brief = messages_for(System("sft", base, "trained", styles={"elsie": "brief"}), item)
    assert brief[0]["content"] == item.brief and brief[1] == trained[1]
    assert "of Carrow Bay" in item.system and "of Carrow Bay" not in item.brief
    assert item.brief.startswith("You are Elsie") and "keeper years" in item.brief
    rag = messages_for(System("rag", base, "rag"), item)
    assert rag[0]["content"].startswith(item.system)
    # The retrieved pieces without their source markers (the annotator saw "[k] ...").
    assert item.context is not None and item.context["knowledge"].startswith("[k] ")
    assert item.context["knowledge"].removeprefix("[k] ") in rag[0]["content"]
    assert "[k] " not in rag[0]["content"]
    assert rag[1] == prompt[1]


def test_rag_re_retrieves_when_the_record_has_no_context(project: Project) -> None:
    item = Item("x", "elsie", "keeper", "ordinary", "<TIME-I>", "You are Elsie.", "Lamp?", "ref")
    seen: list[str] = []

    def fetch(asked: Item) -> dict[str, str]:
        seen.append(asked.question)
        return {"knowledge": "[a.md:1] The lamp burns oil.", "style": ""}

    rag = messages_for(System("rag", project.config.base_model, "rag"), item, fetch)
    assert seen == ["Lamp?"]
    content = rag[0]["content"]
    assert "The lamp burns oil." in content and "[a.md:1]" not in content and "(nothing retrieved)" in content
