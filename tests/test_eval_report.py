"""The report: Markdown, self-contained HTML with tables and embedded plots, rebuilt from files alone."""

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from persllm.cli import app
from persllm.config import load_project
from persllm.errors import UserError
from persllm.evaluate import report
from persllm.evaluate.metrics import DEFINITIONS
from persllm.jsonl import write_jsonl
from persllm.layout import write_json_atomic
from tests.test_eval_project import make_project

PNG = b"\x89PNG\r\n\x1a\n"


def overall(bleu: float, judged: bool) -> dict[str, Any]:
    values: dict[str, Any] = {
        "n": 4,
        "bleu": bleu,
        "rouge_l": bleu / 100,
        "persona_acc": 0.75,
        "stage_acc": 0.5,
        "style_fidelity": 0.02,
        "anachronism_rate": 0.25,
        "intra_bleu": 30.0,
        "stage_bleu": 8.0,
        "inter_bleu": 2.5,
        "intra_cos": 0.8,
        "stage_cos": 0.5,
        "inter_cos": None,
        "empty_rate": 0.0,
    }
    if judged:
        values.update(
            knowledge=3.5, attitude=2.0, premise_detected=0.5, win_rate=0.5, tie_rate=0.5, loss_rate=0.0
        )
    return values


def sample_metrics() -> dict[str, Any]:
    cell = {"n": 2, "bleu": 10.0, "rouge_l": 0.2, "anachronism_rate": 0.0}
    return {
        "definitions": DEFINITIONS,
        "settings": {
            "systems": ["prompt", "sft"],
            "skipped": {"sft+dpo": "no trained model at runs/x/models/elsie/dpo; run `persllm train` first"},
            "samples": 2,
            "params": {"temperature": 0.7, "max_tokens": 64},
            "base_model": "bundled:smollm2",
            "judge": "judge-model",
            "baseline": "prompt",
            "embedder": "bundled:minilm",
        },
        "counts": {"items": 2, "generations": 8},
        "systems": {
            "prompt": {"overall": overall(5.0, False), "by_stage": {"elsie/keeper": cell}},
            "sft": {"overall": overall(12.5, True), "by_stage": {"elsie/keeper": cell}},
        },
        "personality": {
            "sft": {
                "elsie": {
                    "traits": {"O": 3.0, "C": 4.5, "E": 2.0, "A": 3.0, "N": 2.0},
                    "target": {"C": 5.0},
                    "distance": 0.5,
                    "answered": 5,
                    "asked": 5,
                }
            }
        },
    }


def sample_rows() -> list[dict[str, Any]]:
    rows = []
    for system in ("prompt", "sft"):
        for sample in (0, 1):
            rows.append(
                {
                    "system": system,
                    "persona": "elsie",
                    "stage": "keeper",
                    "item": "i0",
                    "sample": sample,
                    "question": "Who keeps the light? <b>bold</b>",
                    "reference": "I keep the light.",
                    "response": f"{system} says | I keep it ({sample})",
                }
            )
    return rows


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in_cell = tag in ("td", "th")
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_the_report_has_tables_plots_and_embedded_images(tmp_path: Path) -> None:
    paths = report.write_report(tmp_path, sample_metrics(), sample_rows())
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "| system | bleu | rouge_l |" in markdown
    assert "| sft | 12.50 | 0.125 |" in markdown
    assert "sft+dpo: no trained model" in markdown
    assert "![overview](plots/overview.png)" in markdown
    assert "sft says \\| I keep it (0)" in markdown  # pipes in text do not break the table
    for name in ("overview", "distinction", "judge", "personality"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes().startswith(PNG)

    page = parse(paths["html"])
    assert page.tags.count("table") >= 5 and "h2" in page.tags
    assert len(page.images) == 4
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert "Who keeps the light? <b>bold</b>" in page.cells  # escaped text, not markup
    assert "b" not in page.tags
    assert "4.500 (5.000)" in page.cells  # trait mean with its target


def test_without_judge_or_personality_those_sections_are_left_out(tmp_path: Path) -> None:
    metrics = sample_metrics()
    metrics["systems"]["sft"]["overall"] = overall(12.5, False)
    metrics["personality"] = {}
    paths = report.write_report(tmp_path, metrics, sample_rows())
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "## Judge" not in markdown and "## Personality" not in markdown
    assert not (tmp_path / "plots" / "judge.png").exists()
    assert len(parse(paths["html"]).images) == 2


def test_report_run_and_cli_rebuild_from_files_alone(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path, {"backend": "transformers", "model": "unused"}))
    with pytest.raises(UserError, match=r"metrics.json: no evaluation results; run `persllm eval"):
        report.run(project)
    out = project.run_dir / "eval"
    write_json_atomic(out / "metrics.json", sample_metrics())
    write_jsonl(out / "generations.jsonl", sample_rows())
    assert json.loads((out / "metrics.json").read_text())["counts"]["generations"] == 8

    result = CliRunner().invoke(app, ["report", str(project.config_path)])
    assert result.exit_code == 0, result.output
    assert str(out / "report.html") in result.output
    assert "| prompt | 5.000 |" in (out / "report.md").read_text(encoding="utf-8")
    assert parse(out / "report.html").images


def test_a_broken_metrics_file_is_a_user_error(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path, {"backend": "transformers", "model": "unused"}))
    (project.run_dir / "eval").mkdir(parents=True)
    (project.run_dir / "eval" / "metrics.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(UserError, match=r"metrics.json: not valid JSON"):
        report.run(project)


@pytest.mark.parametrize("command", ["eval", "report"])
def test_help_ends_with_an_example(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert f"Example: persllm {command} " in result.output
    if command == "eval":
        assert "--systems" in result.output and "--judge" in result.output and "--max-items" in result.output
