"""Scoring against the person's held-out words: per-item metrics, paired intervals, the reference row,
the held-out items, and how the report and the run summary show them (bundled sentence encoder)."""

import json
from pathlib import Path
from typing import Any

from persllm.cli.run import headline
from persllm.config import load_project
from persllm.config.stages import EvalSettings
from persllm.evaluate import report, scores
from persllm.evaluate.systems import load_heldout_items
from persllm.index.encoder import embed
from persllm.jsonl import write_jsonl
from persllm.layout import write_json_atomic
from tests.test_eval_project import CORPUS, make_project

GENERIC = [
    "I am a helpful assistant and I am happy to help you with any question.",
    "That is a very interesting question, and there are many points of view on it.",
    "Thank you for asking. Here is some general information about the topic.",
]


def heldout_rows(n_items: int) -> list[dict[str, Any]]:
    """``prompt`` answers generically; ``sft`` answers with words close to the persona's own."""
    rows = []
    cells = list(CORPUS)
    for i in range(n_items):
        persona, stage = cells[i % len(cells)]
        own = CORPUS[(persona, stage)][1]
        for system, response in (("prompt", GENERIC[i % 3]), ("sft", f"{own} Item {i}.")):
            rows.append(
                {
                    "system": system,
                    "set": "heldout",
                    "persona": persona,
                    "stage": stage,
                    "kind": "ordinary",
                    "item": f"h{i}",
                    "sample": 0,
                    "question": "What do you think of it?",
                    "reference": own,
                    "response": response,
                    "completion_tokens": 10,
                }
            )
    return rows


def test_heldout_metrics_have_paired_intervals_and_a_reference_row(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path, {"backend": "transformers", "model": "none"}))
    rows = heldout_rows(32)
    scored = scores.score(
        *EvalSettings.of_project(project), rows, lambda texts: embed(texts, project.config.embedder), "prompt"
    )
    sft, prompt = scored["systems"]["sft"], scored["systems"]["prompt"]
    assert "overall" not in sft  # no golden rows given
    for name in ("bleu", "rouge_l", "style_fidelity", "persona_acc", "stage_acc"):
        interval = sft["heldout_ci"][name]
        assert interval["n"] == 32 and interval["low"] <= sft["heldout"][name] <= interval["high"]
    assert sft["heldout"]["rouge_l"] > prompt["heldout"]["rouge_l"]
    difference = scored["differences"]["heldout"]["sft"]
    for name in ("rouge_l", "style_fidelity", "persona_acc"):
        assert difference[name]["value"] > 0 and difference[name]["excludes_zero"], name
    assert sft["heldout"]["persona_acc"] == 1.0
    # The real passages themselves: the ceiling of style fidelity and identifiability.
    assert scored["reference"]["heldout"]["persona_acc"] == 1.0
    assert set(scored["reference"]["heldout_ci"]) == {"style_fidelity", "persona_acc", "stage_acc"}


def test_report_and_summary_show_intervals_and_mark_differences(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path, {"backend": "transformers", "model": "none"}))
    rows = heldout_rows(12)
    scored = scores.score(
        *EvalSettings.of_project(project), rows, lambda texts: embed(texts, project.config.embedder), "prompt"
    )
    metrics = {
        "settings": {"systems": ["prompt", "sft"], "baseline": "prompt", "resamples": 1000},
        "counts": {"items": 12, "golden_items": 0, "heldout_items": 12, "generations": 24},
        **scored,
    }
    out = tmp_path / "eval"
    write_json_atomic(out / "metrics.json", metrics)
    paths = report.write_report(out, metrics, rows)
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "## Held-out real words" in markdown and "reference (real words)" in markdown
    assert "| sft - prompt |" in markdown and " * |" in markdown
    assert "Small sample: 12 items" in markdown
    summary = headline(out).splitlines()
    assert summary[2] == "held-out real words: 12 items, 95% paired bootstrap intervals (* excludes 0)"
    line = next(row for row in summary if row.startswith("persona_acc"))
    assert line.endswith("*") and "[" in line and "+" in line


def test_heldout_items_are_read_with_the_persona_prompt(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path, {"backend": "transformers", "model": "none"}))
    record = {
        "id": "q1",
        "persona": "elsie",
        "stage": "keeper",
        "kind": "ordinary",
        "turns": [
            {"role": "user", "content": "What can you tell me about the lamp?"},
            {"role": "assistant", "analysis": "", "content": "I keep the light."},
        ],
        "reply": {"source": "heldout", "ref": "corpus/elsie/keeper/style.txt:1", "question": "topic"},
    }
    write_jsonl(project.run_dir / "annotations" / "heldout" / "elsie.jsonl", [record])
    items = load_heldout_items(project.workspace, None)
    assert [(i.id, i.set, i.question, i.reference) for i in items] == [
        ("q1", "heldout", "What can you tell me about the lamp?", "I keep the light.")
    ]
    assert "Elsie" in items[0].system and items[0].label == "<TIME-I>"
    assert json.loads(json.dumps(items[0].__dict__))["context"] is None
