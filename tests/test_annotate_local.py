"""Annotation with in-process models (the transformers backend) through the two-step fallback."""

import shutil
from pathlib import Path
from typing import Any

import pytest

from persllm.annotate import run
from persllm.annotate.parse import debris
from persllm.config import Project, load_project
from persllm.config.stages import AnnotateSettings, IndexSettings
from persllm.jsonl import read_jsonl
from tests.test_annotate_run import write_project


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from persllm.index import run as build_index

    root = tmp_path_factory.mktemp("ferry-local")
    build_index(*IndexSettings.of_project(load_project(write_project(root))))
    return root


def local_project(indexed: Path, tmp_path: Path, model: str, **overrides: Any) -> Project:
    target = tmp_path / "ferry"
    shutil.copytree(indexed, target)
    settings = {
        "annotator.backend": "transformers",
        "annotator.model": model,
        "annotator.device": "cpu",
        "annotate.output": "two_step",
        **overrides,
    }
    return load_project(target / "persllm.yaml", settings)


def check_records(project: Project, expected: int) -> list[dict[str, Any]]:
    rows = read_jsonl(project.run_dir / "annotations" / "ada.jsonl", strict=True)
    assert len(rows) == expected
    for row in rows:
        assert row["annotator"]["backend"] == "transformers" and row["annotator"]["output"] == "two_step"
        user, assistant = row["turns"]
        assert user["role"] == "user" and user["content"].strip()
        assert assistant["analysis"].strip() and assistant["content"].strip()
        for text in (user["content"], assistant["analysis"], assistant["content"]):
            assert debris(text) is None
    return rows


def test_tiny_model_end_to_end_through_two_step(indexed: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    project = local_project(
        indexed,
        tmp_path,
        str(tiny_model_dir),
        **{
            "annotator.params": {"temperature": 1.0, "max_tokens": 24, "seed": 5},
            "annotate.max_attempts": 12,
            "annotator.concurrency": 2,
        },
    )
    first = run(*AnnotateSettings.of_project(project), limit=2, progress=False)
    # Whatever the tiny model writes, every written record parses cleanly and nothing malformed is kept.
    assert first["done"] + sum(first["failed"].values()) == 2
    assert first["done"] >= 1, first
    rows = check_records(project, first["done"])
    # Two-step: per attempt an analysis call and a response call, after the user-input call(s).
    assert first["calls"] >= 3 * first["done"]
    (project.run_dir / "annotations" / "ada.jsonl").unlink()
    again = run(*AnnotateSettings.of_project(project), limit=2, progress=False)
    assert again["calls"] == again["cached_calls"] == first["calls"]  # the local model is cached too
    assert sorted(r["id"] for r in check_records(project, first["done"])) == sorted(r["id"] for r in rows)


@pytest.mark.slow
def test_smollm2_writes_a_parsed_record_through_the_fallback(indexed: Path, tmp_path: Path) -> None:
    project = local_project(
        indexed,
        tmp_path,
        "bundled:smollm2",
        **{
            "annotator.params": {"temperature": 0.7, "max_tokens": 160},
            "annotate.max_attempts": 3,
            # The annotator's own reply path (own words are on by default with a bundled annotator).
            "annotate.own_words_share": {"ordinary": 0.0, "opinion": 0.0},
        },
    )
    result = run(*AnnotateSettings.of_project(project), limit=1, progress=False)
    assert result["done"] == 1, result
    (row,) = check_records(project, 1)
    assistant = row["turns"][1]
    assert len(assistant["content"].split()) >= 5 and len(assistant["analysis"].split()) >= 5
