"""The judge: prompts, parsing, and the two-order preference logic against a real scripted HTTP server."""

import re
from typing import Any

import pytest

from persllm.config.llm import LLMConfig
from persllm.evaluate import judge
from tests.fake_openai import FakeOpenAI

# --------------------------------------------------------------------------- pure parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Knowledge: 4\nAttitude: 2", (4, 2)),
        ("**Knowledge** - 5\n**Attitude**: 0", (5, 0)),
        ("knowledge:3 attitude:9", (3, None)),
        ("I cannot grade this.", (None, None)),
    ],
)
def test_parse_agreement(text: str, expected: tuple[int | None, int | None]) -> None:
    assert judge.parse_agreement(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("yes", True), ("No.", False), ("Yes, it corrects the date.", True), ("The answer is wrong", None)],
)
def test_parse_yes_no(text: str, expected: bool | None) -> None:
    assert judge.parse_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", "A"),
        ("B.", "B"),
        ("**B**", "B"),
        ("tie", "tie"),
        ("Neither is better", "tie"),
        ("I prefer Answer B because it is dry.", "B"),
        ("a good question", None),
        ("", None),
    ],
)
def test_parse_choice(text: str, expected: str | None) -> None:
    assert judge.parse_choice(text) == expected


def test_two_order_outcome_needs_agreement_across_orders() -> None:
    assert judge.two_order_outcome("A", "B") == "win"
    assert judge.two_order_outcome("B", "A") == "loss"
    assert judge.two_order_outcome("A", "A") == "tie"  # always the first slot: position bias
    assert judge.two_order_outcome("B", "B") == "tie"
    assert judge.two_order_outcome("tie", "B") == "tie"
    assert judge.two_order_outcome(None, None) == "tie"


def test_prompts_carry_question_reference_and_answers() -> None:
    [message] = judge.preference_messages("Elsie Wren", "It is 1889.", "Q?", "REF", "first one", "second one")
    text = message["content"]
    assert message["role"] == "user"
    assert "Elsie Wren" in text and "It is 1889." in text and "REF" in text
    assert text.index("first one") < text.index("second one")
    assert "(no answer)" in judge.agreement_messages("Q", "R", "")[0]["content"]
    assert "false premise" in judge.premise_messages("Q", "R", "x")[0]["content"]


def test_resolve_judge_reads_models_urls_and_both() -> None:
    configured = LLMConfig.model_validate({"backend": "openai", "base_url": "http://h/v1", "model": "big"})
    assert judge.resolve_judge(configured, None) is configured
    assert judge.resolve_judge(None, None) is None
    by_url = judge.resolve_judge(configured, "http://127.0.0.1:9/v1")
    assert by_url is not None and (by_url.backend, by_url.base_url, by_url.model) == (
        "openai",
        "http://127.0.0.1:9/v1",
        "big",
    )
    both = judge.resolve_judge(None, "gpt-x@https://api.example.com/v1")
    assert both is not None and (both.model, both.base_url) == ("gpt-x", "https://api.example.com/v1")
    renamed = judge.resolve_judge(configured, "other")
    assert renamed is not None and (renamed.model, renamed.base_url) == ("other", "http://h/v1")
    local = judge.resolve_judge(None, "/models/judge")
    assert local is not None and (local.backend, local.model) == ("transformers", "/models/judge")


# --------------------------------------------------------------------------- against the scripted server


def rows() -> list[dict[str, Any]]:
    """Two items answered by the baseline (prompt) and by sft, whose answers mention the lamp."""
    base = {"persona": "elsie", "stage": "keeper", "sample": 0, "reference": "I trim the lamp at dusk."}
    out = []
    for n, kind in enumerate(["ordinary", "misleading"]):
        item = {**base, "item": f"i{n}", "kind": kind, "question": f"question {n}?"}
        out.append({**item, "system": "prompt", "response": f"I do my duty, sir ({n})."})
        out.append({**item, "system": "sft", "response": f"I trim the lamp before dark ({n})."})
    out.append({**out[-1], "sample": 1})  # not judged: only the first sample is
    return out


def section(text: str, name: str) -> str:
    match = re.search(rf"{name}:\n(.*?)\n\n", text + "\n\n", flags=re.DOTALL)
    return match.group(1) if match else ""


def prefers_lamp(body: dict[str, Any]) -> str:
    text = body["messages"][-1]["content"]
    if "Answer A:" in text:
        return "A" if "lamp" in section(text, "Answer A") else "B"
    if "false premise" in text:
        return "yes" if "lamp" in section(text, "Answer to check") else "no"
    return (
        "Knowledge: 4\nAttitude: 3"
        if "lamp" in section(text, "Answer to grade")
        else "Knowledge: 1\nAttitude: 1"
    )


def run_judge(server: FakeOpenAI, data: list[dict[str, Any]]) -> None:
    cfg = LLMConfig.model_validate(
        {"backend": "openai", "base_url": server.base_url, "model": "judge", "max_retries": 0}
    )
    personas = {"elsie/keeper": ("Elsie Wren", "It is 1889.")}
    judged = judge.judge_all(cfg, None, {"temperature": 0.0, "max_tokens": 32}, data, "prompt", personas)
    assert judged == 4


def test_a_consistent_preference_is_a_win_for_the_system() -> None:
    data = rows()
    with FakeOpenAI(default_reply=prefers_lamp) as server:
        run_judge(server, data)
    sft = [r for r in data if r["system"] == "sft" and r["sample"] == 0]
    assert [r["judge"]["preference"] for r in sft] == ["win", "win"]
    assert all(r["judge"]["knowledge"] == 4 and r["judge"]["attitude"] == 3 for r in sft)
    assert [r["judge"].get("premise_detected") for r in sft] == [None, True]
    baseline = [r for r in data if r["system"] == "prompt"]
    assert all("preference" not in r["judge"] for r in baseline)  # the baseline is not compared with itself
    assert [r["judge"]["knowledge"] for r in baseline] == [1, 1]
    assert baseline[1]["judge"]["premise_detected"] is False
    assert "judge" not in data[-1]
    # Both orders were asked: each sft answer appeared once as A and once as B.
    preference = [
        b["messages"][-1]["content"] for b in server.requests if "Answer A:" in b["messages"][-1]["content"]
    ]
    assert len(preference) == 4
    for n in range(2):
        mine = f"I trim the lamp before dark ({n})."
        assert sum(mine in section(p, "Answer A") for p in preference) == 1
        assert sum(mine in section(p, "Answer B") for p in preference) == 1
    assert all(b["temperature"] == 0.0 and b["model"] == "judge" for b in server.requests)


def test_a_judge_that_always_says_a_gives_only_ties() -> None:
    data = rows()

    def always_a(body: dict[str, Any]) -> str:
        text = body["messages"][-1]["content"]
        return "A" if "Answer A:" in text else "Knowledge: 2\nAttitude: 2"

    with FakeOpenAI(default_reply=always_a) as server:
        run_judge(server, data)
    assert [r["judge"]["preference"] for r in data if r["system"] == "sft" and "judge" in r] == ["tie", "tie"]


def test_a_baseline_preferred_in_both_orders_is_a_loss() -> None:
    data = rows()

    def prefers_duty(body: dict[str, Any]) -> str:
        text = body["messages"][-1]["content"]
        if "Answer A:" in text:
            return "Answer A" if "duty" in section(text, "Answer A") else "Answer B"
        return "Knowledge: 2\nAttitude: 2"

    with FakeOpenAI(default_reply=prefers_duty) as server:
        run_judge(server, data)
    assert [r["judge"]["preference"] for r in data if r["system"] == "sft" and "judge" in r] == [
        "loss",
        "loss",
    ]
