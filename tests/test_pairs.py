"""Preference pairs: provenance, no same-persona negatives, train side only, filters, cross-stage regeneration
through the real annotation engine and base-model replies over HTTP (FakeOpenAI on 127.0.0.1), CLI."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from persllm import curate, pairs
from persllm.config import PersonaConfig, Project, load_project
from persllm.config.stages import CurateSettings, IndexSettings, PairsSettings
from persllm.errors import UserError
from persllm.jsonl import read_jsonl
from persllm.pairs.build import other_stages, pair_problem
from persllm.pairs.sources import nearest_in_range
from persllm.prompting import render_inline
from tests.fake_openai import FakeOpenAI
from tests.test_curate import TOPICS, make_project, record

JONAH_ANSWER = "The Board sits in Edinburgh and never once asked me where the rocks are."
ELSIE_ANSWER = "I kept the lamp burning for forty-one nights before the inspector came."


def elsie_records() -> list[dict[str, Any]]:
    keeper = [record(f"k{i}", TOPICS[i], ELSIE_ANSWER) for i in range(6)]
    engineer = [
        record(f"e{i}", TOPICS[10 + i], ELSIE_ANSWER + " Now I build.", stage="engineer") for i in range(4)
    ]
    return keeper + engineer


def jonah_records() -> list[dict[str, Any]]:
    # Paraphrases of elsie's questions, so every record has a cross-persona neighbour.
    questions = [q.replace("your", "the keeper's").replace("you", "she") for q in TOPICS[:6]]
    return [
        record(f"j{i}", q, JONAH_ANSWER, persona="jonah", stage="sailor") for i, q in enumerate(questions)
    ]


def curated(root: Path, elsie: list[dict[str, Any]] | None = None, **overrides: Any) -> Project:
    path = make_project(root, {"elsie": elsie or elsie_records(), "jonah": jonah_records()})
    project = load_project(path, {"pairs.similarity_min": 0.0, **overrides})
    curate.run(*CurateSettings.of_project(project))
    return project


def split_ids(project: Project, persona: str) -> tuple[set[str], set[str]]:
    data = project.run_dir / "data" / persona
    train = {r["meta"]["id"] for r in read_jsonl(data / "sft_train.jsonl")}
    test = {r["meta"]["id"] for r in read_jsonl(data / "sft_test.jsonl")}
    return train, test


def dpo_rows(project: Project, persona: str) -> list[dict[str, Any]]:
    return read_jsonl(project.run_dir / "data" / persona / "dpo_train.jsonl")


# --------------------------------------------------------------------------- pure parts


def test_pair_problem() -> None:
    assert pair_problem("The lamp burns oil.", " The lamp burns oil. ", 0.2) == "identical"
    # Jaccard 5/7: a difference of 0.29
    assert pair_problem("the lamp burns oil all night", "the lamp burns oil all nights", 0.3) == "too_similar"
    assert pair_problem("the lamp burns oil all night", "the lamp burns oil all nights", 0.25) is None
    assert pair_problem("the lamp burns oil", "stone breakwaters take years", 0.2) is None
    assert pair_problem("a b c d e", "a b c d f", 0.0) is None


def test_nearest_in_range_respects_both_bounds() -> None:
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    angles = [0.0, 0.5, 1.2]  # cosines with query 0: 1.0, 0.878, 0.362
    others = np.array([[np.cos(a), np.sin(a)] for a in angles], dtype=np.float32)
    index, sims = nearest_in_range(queries, others, 0.3, 0.98)
    assert index.tolist()[0] == 1 and sims[0] == pytest.approx(np.cos(0.5), abs=1e-5)
    assert index.tolist()[1] == 2  # sin(1.2) = 0.93
    index, _ = nearest_in_range(queries, others, 0.95, 0.99)
    assert index.tolist() == [-1, -1]
    assert nearest_in_range(queries, np.zeros((0, 2), np.float32), 0.0, 1.0)[0].tolist() == [-1, -1]


def test_other_stages_nearest_first() -> None:
    stages = [{"id": s, "time": s, "knowledge": ["x"]} for s in "abcd"]
    persona = PersonaConfig.model_validate({"id": "p", "name": "P", "stages": stages})
    assert other_stages(persona, "b", 2) == ["a", "c"]
    assert other_stages(persona, "d", 5) == ["c", "b", "a"]


# --------------------------------------------------------------------------- cross-persona


def test_cross_persona_pairs_use_train_side_and_never_the_same_persona(tmp_path: Path) -> None:
    project = curated(tmp_path, **{"pairs.cross_stage": False})
    result = pairs.run(*PairsSettings.of_project(project))
    assert result["pairs"] == result["cross_persona"] > 0 and result["cross_stage"] == 0
    sft = {
        r["meta"]["id"]: r
        for p in ("elsie", "jonah")
        for r in read_jsonl(project.run_dir / "data" / p / "sft_train.jsonl")
    }
    for persona in ("elsie", "jonah"):
        train, _ = split_ids(project, persona)
        rows = dpo_rows(project, persona)
        assert {r["meta"]["source_id"] for r in rows} == train  # every training record, no test item
        other = "jonah" if persona == "elsie" else "elsie"
        other_train, other_test = split_ids(project, other)
        for row in rows:
            meta = row["meta"]
            assert meta["provenance"] == "cross_persona"
            assert meta["rejected_from"]["persona"] == other != persona
            assert (
                meta["rejected_from"]["id"] in other_train and meta["rejected_from"]["id"] not in other_test
            )
            assert 0.0 <= meta["rejected_from"]["similarity"] <= 0.98
            # Same prompt as the SFT row (system prompt + label token), same CoT rendering.
            assert row["prompt"] == sft[meta["source_id"]]["messages"][:2]
            assert row["chosen"] == [sft[meta["source_id"]]["messages"][2]]
            neighbour = sft[meta["rejected_from"]["id"]]["messages"][2]["content"]
            assert row["rejected"] == [{"role": "assistant", "content": neighbour}]
            assert row["rejected"][0]["content"].startswith("<think>\n")
    stats = json.loads((project.run_dir / "data" / "elsie" / "stats.json").read_text())
    assert stats["curate"]["kept"] == 10  # curate's key survives
    assert stats["pairs"]["provenance"]["cross_persona"]["kept"] == stats["pairs"]["pairs"]
    manifest = json.loads((project.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["pairs"]["status"] == "done"


def test_cross_persona_neighbour_is_most_similar_input(tmp_path: Path) -> None:
    project = curated(tmp_path, **{"pairs.cross_stage": False, "curate.test_fraction": 0.0})
    pairs.run(*PairsSettings.of_project(project), ["jonah"])
    rows = dpo_rows(project, "jonah")
    assert len(rows) == 6
    # j0-j3 paraphrase elsie's k0-k3: their nearest neighbours. j4 and j5 repeat k4 and k5 word for word:
    # cosine 1.0 is above similarity_max (0.98), so another input is the neighbour.
    matches = {r["meta"]["source_id"]: r["meta"]["rejected_from"]["id"] for r in rows}
    assert {key: matches[key] for key in ("j0", "j1", "j2", "j3")} == {f"j{i}": f"k{i}" for i in range(4)}
    assert matches["j4"] != "k4" and matches["j5"] != "k5"
    project = load_project(project.config_path, {"pairs.similarity_min": 0.0, "pairs.similarity_max": 1.0})
    pairs.run(*PairsSettings.of_project(project), ["jonah"])
    matches = {r["meta"]["source_id"]: r["meta"]["rejected_from"]["id"] for r in dpo_rows(project, "jonah")}
    assert matches["j4"] == "k4" and matches["j5"] == "k5"
    assert not (project.run_dir / "data" / "elsie" / "dpo_train.jsonl").exists()
    manifest = json.loads((project.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["pairs"]["status"] == "partial"


def test_pair_filters_drop_identical_and_too_similar_and_count_them(tmp_path: Path) -> None:
    elsie = [record(f"k{i}", TOPICS[i], ELSIE_ANSWER) for i in range(6)]
    elsie[0]["turns"][1]["content"] = JONAH_ANSWER  # identical to its neighbour's reply
    elsie[1]["turns"][1]["content"] = JONAH_ANSWER.replace("once", "ever")  # one word apart
    overrides = {"pairs.cross_stage": False, "curate.test_fraction": 0.0, "pairs.min_difference": 0.3}
    project = curated(tmp_path, elsie, **overrides)
    stats = pairs.run(*PairsSettings.of_project(project), ["elsie"])["personas"]["elsie"]
    counts = stats["provenance"]["cross_persona"]
    assert counts == {"candidates": 6, "unavailable": 0, "identical": 1, "too_similar": 1, "kept": 4}
    assert {r["meta"]["source_id"] for r in dpo_rows(project, "elsie")} == {"k2", "k3", "k4", "k5"}
    # Out of the similarity range (paraphrases are below it, word-for-word copies above): unavailable.
    project = load_project(
        project.config_path, {**overrides, "pairs.similarity_min": 0.999, "pairs.similarity_max": 0.999}
    )
    counts = pairs.run(*PairsSettings.of_project(project), ["elsie"])["personas"]["elsie"]["provenance"][
        "cross_persona"
    ]
    assert counts["unavailable"] == 6 and counts["kept"] == 0


def test_pairs_before_curate_is_a_user_error(tmp_path: Path) -> None:
    project = load_project(make_project(tmp_path, {"elsie": elsie_records()}))
    with pytest.raises(
        UserError, match=r"sft_train\.jsonl: persona 'elsie' is not curated; run `persllm curate`"
    ):
        pairs.run(*PairsSettings.of_project(project), ["elsie"])


# ------------------------------------------------------------------------- over HTTP: cross-stage, base model


def fake_model(body: dict[str, Any]) -> str:
    """Annotator replies (JSON-schema requests) that depend on the stage's year; plain base-model replies."""
    text = "\n".join(m["content"] for m in body["messages"])
    if body.get("response_format"):
        year = next((y for y in ("1905", "1889", "1880") if f"It is {y}" in text), "unknown")
        return json.dumps(
            {
                "analysis": f"The user asks about my work; in {year} I know what the record says.",
                "response": f"In {year} my days go to breakwater stones and the new electric wiring.",
            }
        )
    return "Lighthouses are tall towers with lamps that help ships find their way at night."


def with_server(project_root: Path, server: FakeOpenAI, **overrides: Any) -> Project:
    http = {"backend": "openai", "model": "fake-model", "base_url": server.base_url, "max_retries": 1}
    settings = {f"annotator.{k}": v for k, v in http.items()} | {
        f"base_model.{k}": v for k, v in http.items()
    }
    return load_project(
        project_root / "persllm.yaml", {**settings, "pairs.cross_persona": False, **overrides}
    )


def test_cross_stage_pairs_through_the_annotation_engine(tmp_path: Path) -> None:
    from persllm.index import run as build_index

    elsie = elsie_records()
    # The keeper's k5 answer is what the engineer stage will say: a pair that teaches nothing.
    elsie[5]["turns"][1]["content"] = "In 1905 my days go to breakwater stones and the new electric wiring."
    project = curated(tmp_path, elsie)
    build_index(*IndexSettings.of_project(project))
    with FakeOpenAI(default_reply=fake_model) as server:
        project = with_server(tmp_path, server)
        result = pairs.run(*PairsSettings.of_project(project))
        calls = len(server.requests)
        again = pairs.run(*PairsSettings.of_project(project))
        assert len(server.requests) == calls  # every regeneration came from the cache
    assert again == result
    train, _ = split_ids(project, "elsie")
    assert calls == len(train)  # one other stage per record, one JSON-mode call each
    rows = dpo_rows(project, "elsie")
    stats = result["personas"]["elsie"]["provenance"]["cross_stage"]
    assert stats["candidates"] == len(train) and stats["kept"] == len(rows) == len(train) - ("k5" in train)
    assert stats["identical"] == ("k5" in train)
    for row in rows:
        meta = row["meta"]
        other = "engineer" if meta["stage"] == "keeper" else "keeper"
        assert meta["provenance"] == "cross_stage" and meta["rejected_from"] == {
            "persona": "elsie",
            "stage": other,
        }
        year = "1905" if other == "engineer" else "1889"
        expected = render_inline(
            f"The user asks about my work; in {year} I know what the record says.",
            f"In {year} my days go to breakwater stones and the new electric wiring.",
        )
        assert row["rejected"] == [{"role": "assistant", "content": expected}]
        label = "<ENGINEER>" if meta["stage"] == "engineer" else "<TIME-I>"
        assert row["prompt"][1]["content"].startswith(label + " ")
    bodies = [json.dumps(b["messages"]) for b in server.requests]
    assert all(("It is 1905" in b) != ("It is 1889" in b) for b in bodies)
    assert dpo_rows(project, "jonah") == []  # one stage: nothing to regenerate
    assert result["personas"]["jonah"]["provenance"]["cross_stage"]["candidates"] == 0


def test_base_model_pairs_have_no_persona_in_the_request(tmp_path: Path) -> None:
    project = curated(tmp_path, **{"curate.cot": "none"})  # pairs follow the data, not today's config
    with FakeOpenAI(default_reply=fake_model) as server:
        project = with_server(tmp_path, server, **{"pairs.cross_stage": False, "pairs.base_model": True})
        result = pairs.run(*PairsSettings.of_project(project), ["jonah"])
        bodies = list(server.requests)
    train, _ = split_ids(project, "jonah")
    assert result["base_model"] == len(train) == len(bodies)
    for body in bodies:
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert not body["messages"][0]["content"].startswith("<")
        assert "Jonah" not in json.dumps(body)
    for row in dpo_rows(project, "jonah"):
        assert row["meta"]["provenance"] == "base_model"
        assert row["meta"]["rejected_from"] == {"persona": None, "stage": None, "model": "fake-model"}
        assert row["rejected"][0]["content"].startswith("Lighthouses are tall towers")
        assert row["chosen"] == [{"role": "assistant", "content": JONAH_ANSWER}]  # cot: none


# --------------------------------------------------------------------------- CLI


def test_cli_pairs_prints_counts_and_help(tmp_path: Path) -> None:
    from persllm.cli import app

    project = curated(tmp_path, **{"pairs.cross_stage": False})
    runner = CliRunner()
    args = [
        "pairs",
        str(project.config_path),
        "--set",
        "pairs.cross_stage=false",
        "--set",
        "pairs.similarity_min=0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.split()[:2] == ["persona", "sources"] and "cross_persona" in header
    counts = {
        line.split()[0]: line.split()
        for line in lines
        if line.split() and line.split()[0] in ("elsie", "jonah")
    }
    assert counts["elsie"][-1] == str(len(dpo_rows(project, "elsie")))
    help_text = runner.invoke(app, ["pairs", "--help"]).output
    assert "Example:" in help_text and "persllm pairs" in help_text


def test_cosine_bounds_tolerate_float_rounding() -> None:
    from persllm.curate.dedup import dedup

    # Float32 rounding puts a word-for-word repeat at a cosine of 1 + a few 1e-7, either side of 1.0.
    query = np.array([[0.6, 0.8]], dtype=np.float32)
    over = np.array([[0.6000001, 0.8000001]], dtype=np.float32)
    assert float((query @ over.T)[0, 0]) > 1.0
    assert nearest_in_range(query, over, 0.0, 1.0)[0].tolist() == [0]
    assert nearest_in_range(query, over, 0.0, 0.99)[0].tolist() == [-1]
    assert dedup(np.concatenate([query, over]), 1.0).tolist() == [True, False]
