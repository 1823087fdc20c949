"""End to end with real models: a tiny Llama as the base, a real LoRA adapter (stage tokens added) as
each persona's "sft" model, the bundled sentence encoder, a judge and a remote system on the scripted
HTTP server; then the CLI on the same project."""

import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from persllm.cli import app
from persllm.config import Project, load_project
from persllm.config.stages import EvalSettings, IndexSettings
from persllm.jsonl import read_jsonl
from tests.fake_openai import FakeOpenAI
from tests.test_eval_personality import questionnaire
from tests.test_eval_project import make_project, write_heldout


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """This machine's cores are shared by many processes: torch's thread pool then spins and waits far
    more than it computes (a 64-wide linear layer takes 30x longer with 2 threads than with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_adapter(
    base: Path, target: Path, labels: list[str], answer: str, steps: int = 3, new_tokens: bool = False
) -> Path:
    """A LoRA adapter on ``base`` trained a few real steps on a labelled exchange; with ``new_tokens`` the
    labels are added as special tokens and the grown embeddings are saved with the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": labels})
        model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": f"{labels[0]} Who keeps the light?"},
            {"role": "assistant", "content": answer},
        ],
        tokenize=False,
    )
    batch = tokenizer([text], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(target, save_embedding_layers=new_tokens)
    tokenizer.save_pretrained(target)
    return target


def assert_adapters_used(requests: list[dict[str, Any]]) -> None:
    """Trained-system calls carry their persona's adapter and the label token; the others neither."""
    adapters: dict[str, set[str]] = {}
    for request in requests:
        persona = "elsie" if request["messages"][0]["content"].startswith("You are Elsie") else "jonah"
        labelled = request["messages"][1]["content"].startswith("<TIME-")
        assert labelled == bool(request["adapter"])
        if request["adapter"]:
            adapters.setdefault(persona, set()).add(request["adapter"])
    assert len(adapters["elsie"]) == len(adapters["jonah"]) == 1 and adapters["elsie"] != adapters["jonah"]


def judge_reply(body: dict[str, Any]) -> str:
    text = body["messages"][-1]["content"]
    if "Answer A:" in text:
        return "A"  # position bias: must come out as ties
    if "false premise" in text:
        return "yes"
    if "Turn the answer into a rating" in text:
        return "4"
    return "Knowledge: 3\nAttitude: 4"


def setup(tmp_path: Path, model: Path, remote: str = "", judge: str = "") -> Project:
    """The test project with adapters; with endpoints given, also a remote system, a judge and an index."""
    base_model = {
        "backend": "transformers",
        "model": str(model),
        "concurrency": 8,
        "params": {"max_tokens": 12},
    }
    eval_cfg: dict[str, Any] = {
        "systems": ["prompt", "rag", "sft", "sft+dpo", "remote"],
        "extra_systems": {"remote": {"backend": "openai", "base_url": remote, "model": "remote-model"}},
        "judge": {"backend": "openai", "base_url": judge, "model": "judge-model"},
        "questionnaire": str(questionnaire(tmp_path)),
        "questionnaire_items": 5,
        "params": {"temperature": 0.8, "max_tokens": 12},
    }
    if not remote:
        eval_cfg = {"params": eval_cfg["params"]}
    project = load_project(make_project(tmp_path, base_model, eval_cfg))
    write_heldout(project, per_stage=2, without_context=1 if remote else 0)
    for persona in project.personas.values():
        labels = [str(stage.label) for stage in persona.stages]
        folder = project.run_dir / "models" / persona.id / "sft"
        # jonah's adapter grew the vocabulary (new stage tokens): it runs on a base model of its own.
        make_adapter(model, folder, labels, f"{persona.name} does.", new_tokens=persona.id == "jonah")
    if remote:
        from persllm import index

        index.run(
            *IndexSettings.of_project(project)
        )  # rag re-retrieves for the records whose annotation is gone
    return project


def cached_requests(project: Project) -> list[dict[str, Any]]:
    db = sqlite3.connect(project.run_dir / "cache.sqlite")
    try:
        return [
            json.loads(r[0]) for r in db.execute("SELECT request FROM calls WHERE backend = 'transformers'")
        ]
    finally:
        db.close()


@pytest.mark.slow
def test_the_cli_evaluates_the_base_model_and_the_adapters(tmp_path: Path, tiny_model_dir: Path) -> None:
    project = setup(tmp_path, tiny_model_dir)
    runner = CliRunner()
    config = str(project.config_path)
    done = runner.invoke(app, ["eval", config, "--systems", "prompt,rag,sft,sft+dpo", "--max-items", "1"])
    assert done.exit_code == 0, done.output
    assert "skipped sft+dpo: no trained model at" in done.output
    # The summary: metrics as rows, one column per system, each a value with its interval.
    assert re.search(r"^metric\s+prompt\s+rag\s+sft\s+sft - prompt$", done.output, flags=re.MULTILINE)
    assert re.search(r"^bleu\s+\d+\.\d+ \[", done.output, flags=re.MULTILINE)

    out = project.run_dir / "eval"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics["systems"]) == ["prompt", "rag", "sft"]
    assert metrics["counts"] == {
        "items": 4,
        "golden_items": 4,
        "heldout_items": 0,
        "heldout_exchanges": 0,
        "generations": 3 * 4 * 2,
    }
    assert metrics["settings"]["params"] == {"temperature": 0.8, "max_tokens": 12}
    for data in metrics["systems"].values():
        overall = data["overall"]
        assert overall["n"] == 8 and overall["bleu"] is not None and overall["persona_acc"] is not None
        assert "knowledge" not in overall  # no judge configured
    rows = read_jsonl(out / "generations.jsonl")
    assert {r["sample"] for r in rows} == {0, 1} and all(r["completion_tokens"] <= 12 for r in rows)
    requests = cached_requests(project)
    assert {r["params"]["n_sample"] for r in requests} == {0, 1}  # samples are distinct cache entries
    assert_adapters_used(requests)
    rag = [r for r in requests if "Here is what you know" in r["messages"][0]["content"]]
    assert len(rag) == 4 * 2 and all(knows_something(r["messages"][0]["content"]) for r in rag)
    assert json.loads((project.run_dir / "manifest.json").read_text())["stages"]["eval"]["status"] == "done"

    (out / "report.html").unlink()
    rebuilt = runner.invoke(app, ["report", config])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "<table>" in (out / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_a_full_evaluation_with_judge_questionnaire_and_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    from persllm import evaluate

    with (
        FakeOpenAI(default_reply="I keep the light, and I keep it well.") as remote,
        FakeOpenAI(default_reply=judge_reply) as judge,
    ):
        project = setup(tmp_path, tiny_model_dir, remote.base_url, judge.base_url)
        result = evaluate.run(*EvalSettings.of_project(project))
        judged_calls = len(judge.requests)

        # Outputs on disk.
        out = project.run_dir / "eval"
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        assert metrics == json.loads(json.dumps(result, default=str))
        assert set(metrics["systems"]) == {"prompt", "rag", "sft", "remote"}
        assert "sft+dpo" in metrics["settings"]["skipped"]
        assert metrics["settings"]["params"] == {"temperature": 0.8, "max_tokens": 12}
        assert metrics["settings"]["samples"] == 2
        rows = read_jsonl(out / "generations.jsonl")
        assert len(rows) == 4 * 8 * 2
        for name in ("report.md", "report.html", "plots/overview.png", "plots/personality.png"):
            assert (out / name).exists()

        # Every metric family is there for every system.
        for name, data in metrics["systems"].items():
            overall = data["overall"]
            assert overall["n"] == 16
            assert 0.0 <= overall["bleu"] <= 100.0 and 0.0 <= overall["rouge_l"] <= 1.0
            assert overall["intra_bleu"] is not None and overall["inter_cos"] is not None
            assert 0.0 <= overall["persona_acc"] <= 1.0 and 0.0 <= overall["stage_acc"] <= 1.0
            assert overall["style_fidelity"] is not None
            assert overall["knowledge"] == 3.0 and overall["attitude"] == 4.0
            assert overall["premise_detected"] == 1.0
            if name != "prompt":
                assert (overall["win_rate"], overall["tie_rate"]) == (0.0, 1.0)
            assert set(data["by_stage"]) == {
                "elsie/keeper",
                "elsie/engineer",
                "jonah/schoolmaster",
                "jonah/mayor",
            }
            assert data["by_stage"]["elsie/engineer"]["anachronism_rate"] is None  # last stage: nothing later
        remote_rows = [r for r in rows if r["system"] == "remote"]
        assert all(r["response"] == "I keep the light, and I keep it well." for r in remote_rows)
        assert metrics["systems"]["remote"]["overall"]["intra_bleu"] == pytest.approx(100.0)
        assert metrics["personality"]["sft"]["elsie"]["traits"] == {
            "O": 4.0,
            "C": 4.0,
            "E": 4.0,
            "A": 4.0,
            "N": 4.0,
        }
        assert metrics["personality"]["sft"]["elsie"]["distance"] == pytest.approx(1.5)

        # Samples are distinct cache entries; sft really used each persona's adapter and label token.
        requests = cached_requests(project)
        assert {r["params"]["n_sample"] for r in requests} == {0, 1}
        assert_adapters_used(requests)
        rag = [r for r in requests if "Here is what you know" in r["messages"][0]["content"]]
        interviews = [r for r in rag if "Statement:" in r["messages"][1]["content"]]
        assert len(interviews) == 2 * 5  # personas x questionnaire items, also with retrieved context
        rag = [r for r in rag if r not in interviews]
        assert len(rag) == 8 * 2 and all(knows_something(r["messages"][0]["content"]) for r in rag)

        # The manifest records the stage.
        manifest = json.loads((project.run_dir / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["stages"]["eval"]["status"] == "done"
        assert manifest["stages"]["eval"]["systems"] == ["prompt", "rag", "sft", "remote"]

        # A re-run is served from the cache: same generations, no new judge calls.
        again = evaluate.run(*EvalSettings.of_project(project))
        assert len(judge.requests) == judged_calls
        rows_again = read_jsonl(out / "generations.jsonl")
        assert all(r["cached"] for r in rows_again)
        assert [r["output"] for r in rows_again] == [r["output"] for r in rows]
        assert again["systems"]["sft"]["overall"]["bleu"] == metrics["systems"]["sft"]["overall"]["bleu"]

        # The CLI: a subset of systems, a judge URL, one item per persona x stage; then the report.
        runner = CliRunner()
        url = f"other-judge@{judge.base_url}"
        done = runner.invoke(
            app,
            ["eval", str(project.config_path), "--systems", "prompt,sft", "--judge", url, "--max-items", "1"],
        )
        assert done.exit_code == 0, done.output
        assert re.search(r"^rouge_l\s+\d\.\d+ \[", done.output, flags=re.MULTILINE)
        assert "other-judge" in {b["model"] for b in judge.requests}
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        assert set(metrics["systems"]) == {"prompt", "sft"} and metrics["counts"]["items"] == 4
        rebuilt = runner.invoke(app, ["report", str(project.config_path)])
        assert rebuilt.exit_code == 0, rebuilt.output

        bad = runner.invoke(app, ["eval", str(project.config_path), "--systems", "nonesuch"])
        assert bad.exit_code != 0 and "unknown system 'nonesuch'" in str(bad.exception)


def knows_something(system_prompt: str) -> bool:
    """A rag prompt with retrieved knowledge in it, shown without the pieces' source markers."""
    knowledge = system_prompt.split("do not claim knowledge beyond it.", 1)[1].split("Here are things")[0]
    return knowledge.strip() not in ("", "(nothing retrieved)") and not knowledge.strip().startswith("[")
