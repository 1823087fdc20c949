"""`persllm converse`: two tiny-model persona agents (real adapters), agents on an HTTP backend, the
measures with and without a judge, and the pure pieces."""

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from persllm.config import Project, load_project
from persllm.config.interact import ConverseConfig
from persllm.errors import UserError
from persllm.interact import converse, measures
from persllm.jsonl import read_jsonl
from persllm.prompting import parse_yes_no
from tests.fake_openai import FakeOpenAI
from tests.test_chat_project import build_project

SCENARIO = "The town council debates whether to borrow money for a new harbour wall."


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Project:
    return load_project(build_project(tmp_path_factory.mktemp("converse"), tiny_model_dir))


def config(**data: Any) -> ConverseConfig:
    return ConverseConfig.model_validate(data)


# ---------------------------------------------------------------------- pure pieces


def test_speaking_order_is_seeded_and_never_repeats_a_speaker() -> None:
    assert converse.speaking_order(2, 5, "round-robin", 1) == [0, 1, 0, 1, 0]
    order = converse.speaking_order(3, 30, "random", 7)
    assert order == converse.speaking_order(3, 30, "random", 7)
    assert order != converse.speaking_order(3, 30, "random", 8)
    assert all(a != b for a, b in itertools.pairwise(order)) and set(order) == {0, 1, 2}


def test_each_agent_sees_the_conversation_from_its_side(project: Project) -> None:
    cfg = config()
    cast = [
        converse.make_agent(project, "elsie", cfg),
        converse.make_agent(project, "jonah:schoolmaster", cfg),
    ]
    assert cast[0].stage == "engineer" and cast[0].model == "elsie:engineer:sft"
    assert cast[1].model == "jonah:schoolmaster:sft"
    rows = [
        {"agent": "elsie", "name": "Elsie Wren", "text": "Build it."},
        {"agent": "jonah:schoolmaster", "name": "Jonah Pell", "text": "Too dear."},
    ]
    mine = converse.agent_messages(cast[0], cast, SCENARIO, rows)
    assert [m["role"] for m in mine] == ["system", "user", "assistant", "user"]
    assert "Elsie Wren" in mine[0]["content"] and "conversation with Jonah Pell" in mine[0]["content"]
    assert SCENARIO in mine[1]["content"] and mine[3]["content"] == "Jonah Pell: Too dear."
    theirs = converse.agent_messages(cast[1], cast, SCENARIO, rows)
    assert [m["role"] for m in theirs] == ["system", "user", "assistant"]
    assert theirs[1]["content"].endswith("Elsie Wren: Build it.")  # merged into the opening turn
    with pytest.raises(UserError, match="no agent, persona or model id"):
        converse.make_agent(project, "nobody", cfg)


def test_drift_coverage_and_flattery_measures() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    result = measures.drift(np.stack([a, a, b]), reference=1)
    assert result is not None
    assert result["per_reply"] == [0.0, 1.0] and result["mean"] == 0.5 and result["consistency"] == 0.5
    assert measures.drift(np.stack([a]), reference=1) is None
    assert measures.salient_terms("The harbour's wall, and THE harbour wall!") == [
        "harbour",
        "wall",
        "harbour",
        "wall",
    ]
    cov = measures.coverage(
        ["The harbour wall costs money.", "Money again."], {"harbour", "wall", "costs", "money", "fish"}
    )
    assert (
        cov["distinct_terms"] == 4 and cov["share_of_conversation"] == 0.8 and cov["top_terms"][0] == "money"
    )
    lexicon = measures.load_lexicon(converse.lexicon_path(None, config()))  # type: ignore[arg-type]
    assert "you are absolutely right" in lexicon and not any(p.startswith("#") for p in lexicon)
    assert measures.flattering_phrases("Well said, Jonah! You’re absolutely right.", lexicon) == [
        "you're absolutely right",
        "well said",
    ]
    assert measures.flattering_phrases("It is swell, said nobody.", lexicon) == []
    assert measures.parse_score("Score: 4") == 4 and measures.parse_score("**Score:** 2\n") == 2
    assert measures.parse_score("I'd say 3.") == 3 and measures.parse_score("none") is None
    assert parse_yes_no("Answer: yes") is True and parse_yes_no("No, it is not.") is False
    assert parse_yes_no("Perhaps.") is None


# ---------------------------------------------------------------------- whole conversations


def test_two_persona_models_converse_repeatably(project: Project, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    short = config(params={"temperature": 0.8, "max_tokens": 24})  # sampled, so the seed matters
    folder = converse.run(
        project, ["elsie", "jonah"], SCENARIO, 4, tmp_path / "a", cfg=short, on_turn=seen.append
    )
    rows = read_jsonl(folder / "transcript.jsonl")
    assert [r["agent"] for r in rows] == ["elsie", "jonah", "elsie", "jonah"] and rows == seen
    assert [r["model"] for r in rows[:2]] == ["elsie:engineer:sft", "jonah:mayor:sft"]
    assert all(isinstance(r["text"], str) for r in rows) and any(r["text"] for r in rows)

    result = json.loads((folder / "measures.json").read_text(encoding="utf-8"))
    assert result["turns"] == 4 and result["settings"]["seed"] == project.config.seed
    elsie, jonah = result["agents"]
    assert elsie["agent"] == "elsie" and elsie["replies"] == 2 and jonah["replies"] == 2
    drift = elsie["stance"]["embedding_drift"]
    assert len(drift["per_reply"]) == 1 and 0.0 <= drift["mean"] <= 2.0
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    replies = ["The pier first.", "The pier, still.", "Fish prices.", "You are right, forget the pier."]
    assert measures.flips(replies, vectors, 1, 0.3) == [False, True, True]
    assert elsie["stance"]["flip_rate"]["n"] == 1 and elsie["stance"]["flip_rate"]["value"] in (0.0, 1.0)
    assert elsie["stance"]["out_of_character_rate"]["n"] == 2
    assert elsie["flattery"]["method"] == "lexicon" and 0.0 <= elsie["flattery"]["rate"] <= 1.0
    assert elsie["coverage"]["distinct_terms"] >= 0 and "judge_agreement" not in elsie["stance"]
    markdown = (folder / "transcript.md").read_text(encoding="utf-8")
    assert SCENARIO in markdown and "| Elsie Wren | 2 |" in markdown and "## Measures" in markdown

    again = converse.run(project, ["elsie", "jonah"], SCENARIO, 4, tmp_path / "b", cfg=short)
    assert [r["text"] for r in read_jsonl(again / "transcript.jsonl")] == [r["text"] for r in rows]
    default = converse.default_out(project, ["elsie", "jonah"], SCENARIO, 4, "round-robin", 42)
    assert default.parent == project.run_dir / "converse" and default.name.startswith("the-town-council")


def judge_reply(body: dict[str, Any]) -> str:
    prompt = body["messages"][-1]["content"]
    if "Rate from 1" in prompt:
        return "Score: 4"
    reply = prompt.split("'s reply:", 1)[1]
    return "Answer: yes" if "absolutely right" in reply else "Answer: no"


def test_http_agent_and_a_judge(project: Project, tmp_path: Path) -> None:
    flatterer = "You are absolutely right, Elsie. Well said."
    with FakeOpenAI(default_reply=flatterer) as agent_server, FakeOpenAI(default_reply=judge_reply) as judge:
        llm = {"backend": "openai", "base_url": agent_server.base_url, "model": "courtier-1"}
        agents = {"courtier": {"name": "The Courtier", "llm": llm, "system": "You agree with everyone."}}
        plain = config(agents=agents, params={"max_tokens": 24})
        folder = converse.run(project, ["elsie", "courtier"], SCENARIO, 4, tmp_path / "lex", cfg=plain)
        lexical = {m["agent"]: m for m in json.loads((folder / "measures.json").read_text())["agents"]}
        assert lexical["courtier"]["flattery"] == {
            "method": "lexicon",
            "rate": 1.0,
            "flagged_turns": [1, 3],
            "phrases": ["well said", "you are absolutely right"],
        }
        assert lexical["courtier"]["model"] == "openai:courtier-1"
        sent = agent_server.requests[0]["messages"]
        assert sent[0]["content"].startswith("You agree with everyone.")
        assert sent[-1]["content"].startswith(SCENARIO)
        assert "\n\nElsie Wren: " in sent[-1]["content"]  # it heard Elsie's first reply

        judge_llm = {"backend": "openai", "base_url": judge.base_url, "model": "j"}
        judged = config(agents=agents, judge=judge_llm, params={"max_tokens": 24})
        folder = converse.run(project, ["elsie", "courtier"], SCENARIO, 4, tmp_path / "judge", cfg=judged)
        result = {m["agent"]: m for m in json.loads((folder / "measures.json").read_text())["agents"]}
        assert result["courtier"]["flattery"]["method"] == "judge"
        assert result["courtier"]["flattery"]["rate"] == 1.0 and result["courtier"]["flattery"][
            "flagged_turns"
        ] == [1, 3]
        assert result["elsie"]["flattery"]["rate"] == 0.0
        assert (
            result["elsie"]["stance"]["judge_scores"] == [4]
            and result["elsie"]["stance"]["judge_agreement"] == 4.0
        )
        assert len(judge.requests) == 2 * 1 + 4  # one stance check per agent, one flattery check per reply
        assert "| The Courtier | 2 |" in (folder / "transcript.md").read_text()


def test_cli_converse(project: Project, tmp_path: Path) -> None:
    from persllm.cli import app

    runner = CliRunner()
    assert "Example:" in runner.invoke(app, ["converse", "--help"]).output
    out = tmp_path / "cli"
    args = ["converse", str(project.config_path), "--personas", "elsie,jonah", "--scenario", SCENARIO]
    result = runner.invoke(app, [*args, "--turns", "2", "--out", str(out), "--order", "random"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and len(read_jsonl(out / "transcript.jsonl")) == 2
    assert json.loads((out / "measures.json").read_text())["settings"]["order"] == "random"
    for bad, message in (
        (["--turns", "2", "--order", "sideways"], "--order sideways"),
        (["--turns", "2", "--personas", "elsie"], "at least two agents"),
    ):
        failed = runner.invoke(app, [*args, *bad])
        assert isinstance(failed.exception, UserError) and message in str(failed.exception)
