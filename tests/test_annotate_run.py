"""The annotation engine and ``persllm annotate`` end to end against a real local OpenAI-compatible server.

The project is built in tmp with a real MiniLM index; the annotator is the real ``openai`` backend
talking HTTP to ``FakeOpenAI`` on 127.0.0.1, which answers each kind of prompt plausibly.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from persllm.annotate import run
from persllm.annotate.engine import Annotator
from persllm.annotate.plan import plan_items
from persllm.config import Project, load_project
from persllm.config.stages import AnnotateSettings, IndexSettings
from persllm.hashing import stable_hash
from persllm.index.retrieve import Retriever
from persllm.jsonl import read_jsonl
from persllm.llm import make_backend, open_cache, run_sync
from tests.fake_openai import FakeOpenAI, Fault

PERSLLM = [sys.executable, "-m", "persllm.cli"]  # the interpreter running the tests, its persllm

PERSONA_YAML = """\
id: ada
name: Ada Thorne
profile: >-
  Ada Thorne works the steam ferries of Lake Marrow all her life, first as mate and later as
  harbour master. She is blunt and careful, trusts her tide tables, and has no patience for flattery.
language: en
stages:
  - id: mate
    time: "It is 1890, aboard the steam ferry Heron on Lake Marrow."
    knowledge: ["corpus/mate/*.md"]
    style: ["corpus/mate/*.txt"]
  - id: master
    time: "It is 1904, in the harbour office at Marrow Quay."
    knowledge: ["corpus/master/*.md"]
    style: ["corpus/master/*.txt"]
"""
CORPUS = {
    "mate/life.md": [
        "Ada Thorne signed on as mate of the steam ferry Heron in 1887, the first woman to hold the post.",
        "The Heron crossed Lake Marrow four times a day in summer and twice a day in winter.",
        "In the storm of March 1889 the Heron lost her funnel, and Ada brought her home under sail.",
        "The ferry company paid Ada forty pounds a year, ten less than the mate before her.",
    ],
    "mate/words.txt": [
        "A lake is only a sea that has not made up its mind yet.",
        "I do not need the captain's praise. I need his soundings written down.",
        "Tell the passengers the Heron is late because the lake is early.",
    ],
    "master/life.md": [
        "In 1901 Ada became harbour master at Marrow Quay, in charge of forty berths.",
        "She had the old timber pier rebuilt in stone between 1902 and 1903.",
        "The electric lamps on the quay were lit for the first time in October 1903.",
    ],
    "master/words.txt": [
        "Stone does not care who paid for it, only whether it was laid true.",
        "A harbour master who is liked is a harbour master who has not yet said no.",
    ],
}


def write_project(root: Path, annotate: str = "") -> Path:
    (root / "personas").mkdir(parents=True)
    (root / "personas" / "ada.yaml").write_text(PERSONA_YAML.replace("corpus/", "../corpus/"))
    for name, paragraphs in CORPUS.items():
        path = root / "corpus" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(paragraphs) + "\n")
    config = root / "persllm.yaml"
    config.write_text(
        "project: ferry\npersonas: [personas/ada.yaml]\nseed: 3\n"
        "annotator:\n  backend: openai\n  model: fake-model\n  base_url: http://127.0.0.1:9/v1\n"
        "  concurrency: 4\n  max_retries: 1\n  timeout: 20\n  params: {temperature: 0.7, max_tokens: 300}\n"
        "annotate:\n  counts: {ordinary: 2, misleading: 1, opinion: 1}\n  multi_turn_share: 0.0\n"
        "retrieval: {knowledge_words: 60, style_words: 30}\n" + annotate
    )
    return config


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with its real MiniLM index, built once; tests work on copies."""
    from persllm.index import run as build_index

    root = tmp_path_factory.mktemp("ferry-template")
    build_index(*IndexSettings.of_project(load_project(write_project(root))))
    return root


@pytest.fixture()
def project_dir(indexed: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ferry"
    shutil.copytree(indexed, target)
    return target


def load(project_dir: Path, server: FakeOpenAI, **overrides: Any) -> Project:
    return load_project(project_dir / "persllm.yaml", {"annotator.base_url": server.base_url, **overrides})


def user_text(body: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in body["messages"])


def annotator_reply(body: dict[str, Any]) -> str:
    """A well-behaved annotator: answers each prompt in the shape it asks for."""
    text = user_text(body)
    tag = stable_hash(body["messages"], length=6)
    if body.get("response_format"):
        return json.dumps(
            {
                "analysis": f"The user asks about the Heron; checked against the record ({tag}).",
                "response": f"I will tell you plainly: the lake decides, not the timetable ({tag}).",
            }
        )
    if "Write only the visitor's" in text:
        return f'"Captain, is it true the Heron crossed six times a day in winter? ({tag})"'
    if "RESPONSE:" in text:
        return f"**Analysis:** The premise is wrong ({tag}).\n\n**Response:** Twice a day in winter ({tag})."
    if "write short private notes" in text:
        return f"The user has the number of crossings wrong ({tag})."
    return f"Twice in winter, and glad of it ({tag})."


def records(project: Project) -> list[dict[str, Any]]:
    return read_jsonl(project.run_dir / "annotations" / "ada.jsonl", strict=True)


# --------------------------------------------------------------------------- the run


def test_records_have_the_schema_and_parsed_replies(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        project = load(project_dir, server)
        result = run(*AnnotateSettings.of_project(project), progress=False)
    rows = records(project)
    assert result["planned"] == 8 and result["done"] == 8 and len(rows) == 8
    assert result["status"] == "done" and result["failed"] == {"ordinary": 0, "misleading": 0, "opinion": 0}
    assert sorted(r["kind"] for r in rows) == ["misleading"] * 2 + ["opinion"] * 2 + ["ordinary"] * 4
    for row in rows:
        assert set(row) == {
            "id",
            "persona",
            "stage",
            "kind",
            "seed",
            "turns",
            "context",
            "annotator",
            "reply",
        }
        assert row["reply"] == {"source": "annotator"}
        assert row["persona"] == "ada" and row["stage"] in ("mate", "master")
        assert set(row["seed"]) == {"source", "ref", "text"} and row["seed"]["ref"].startswith("corpus/")
        assert row["seed"]["source"] in ("knowledge", "style")
        user, assistant = row["turns"]
        assert user["role"] == "user" and user["content"].startswith("Captain, is it true")  # quotes stripped
        assert assistant["role"] == "assistant"
        assert assistant["analysis"].startswith("The user asks about the Heron")
        assert assistant["content"].startswith("I will tell you plainly")
        assert row["context"]["knowledge"] or row["context"]["style"]
        if row["seed"]["source"] == "knowledge":  # seed first in its own context
            assert row["context"]["knowledge"].startswith(f"[{row['seed']['ref']}] {row['seed']['text']}")
        assert row["annotator"] == {
            "backend": "openai",
            "model": "fake-model",
            "params": {"temperature": 0.7, "max_tokens": 300},
            "output": "json",
        }
    assert len({r["id"] for r in rows}) == 8
    manifest = json.loads((project.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["annotate"]["status"] == "done"
    assert manifest["stages"]["annotate"]["records"] == {"ada": 8}


def test_structured_output_request_shape_and_time_phrase(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        project = load(project_dir, server)
        run(*AnnotateSettings.of_project(project), progress=False)
        bodies = list(server.requests)
    inputs = [b for b in bodies if "Write only the visitor's words" in user_text(b)]
    replies = [b for b in bodies if b.get("response_format")]
    assert len(inputs) == 8 and len(replies) == 8 and len(bodies) == 16
    for body in inputs:
        text = user_text(body)
        assert "Ada Thorne" in text and "trusts her tide tables" in text
        assert (
            "It is 1890, aboard the steam ferry Heron" in text or "It is 1904, in the harbour office" in text
        )
        assert "response_format" not in body
    for body in replies:
        assert body["response_format"]["type"] == "json_schema"
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema["required"] == ["analysis", "response"]
        assert body["temperature"] == 0.7 and body["max_tokens"] == 300
        assert "n_sample" not in body and "tag" not in body
        assert "It is 1890" in user_text(body) or "It is 1904" in user_text(body)


def test_second_run_is_served_from_the_cache(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        project = load(project_dir, server)
        first = run(*AnnotateSettings.of_project(project), progress=False)
        before = records(project)
        sent = len(server.requests)
        # Nothing left to do: no item is even started.
        again = run(*AnnotateSettings.of_project(project), progress=False)
        assert again["done"] == 0 and again["skipped"] == 8 and again["calls"] == 0
        # The annotations lost: every call is answered from cache.sqlite, none reaches the server.
        (project.run_dir / "annotations" / "ada.jsonl").unlink()
        cached = run(*AnnotateSettings.of_project(project), progress=False)
        assert len(server.requests) == sent
    assert first["calls"] == sent and first["cached_calls"] == 0
    assert cached["done"] == 8 and cached["calls"] == sent and cached["cached_calls"] == sent
    assert sorted(records(project), key=lambda r: r["id"]) == sorted(before, key=lambda r: r["id"])


def test_resume_skips_finished_items(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        project = load(project_dir, server)
        first = run(*AnnotateSettings.of_project(project), limit=3, progress=False)
        second = run(*AnnotateSettings.of_project(project), progress=False)
    assert first["done"] == 3 and first["status"] == "partial"
    assert second["skipped"] == 3 and second["done"] == 5 and second["status"] == "done"
    ids = [r["id"] for r in records(project)]
    assert len(ids) == len(set(ids)) == 8


def test_malformed_outputs_are_retried_counted_and_never_written(project_dir: Path) -> None:
    def broken(body: dict[str, Any]) -> str:
        return "Sorry, I am not sure." if body.get("response_format") else annotator_reply(body)

    with FakeOpenAI(default_reply=broken) as server:
        project = load(project_dir, server)
        result = run(*AnnotateSettings.of_project(project), progress=False)
        assert len(server.requests) == 8 * (1 + 3)  # one user input + max_attempts replies per item
    assert result["done"] == 0 and result["failed"] == {"ordinary": 4, "misleading": 2, "opinion": 2}
    assert result["malformed"] == {"unparseable": 24}
    # Every attempt malformed: given up (a re-run gets the same cached outputs), so the stage is not
    # partial, and each item is listed with its reason.
    assert records(project) == [] and result["status"] == "done" and result["given_up"] == 8
    failures = read_jsonl(project.layout.failures("annotate"))
    assert len(failures) == 8 and {f["reason"] for f in failures} == {"malformed after 3 attempts"}
    assert all(f["given_up"] and f["attempts"] == 3 for f in failures)
    cache = open_cache(project)
    assert len(cache) == 32  # each retry was a new sample, so a distinct cache entry


def test_a_retry_recovers_with_a_new_sample(project_dir: Path) -> None:
    good = annotator_reply({"messages": [{"role": "user", "content": "x"}], "response_format": {"x": 1}})
    debris = json.dumps({"analysis": "fine", "response": "<|im_start|>assistant\nHello"})
    with FakeOpenAI(default_reply=annotator_reply) as server:
        server.queue("Why did the Heron stop running?", "not json", debris, good)
        project = load(project_dir, server)
        result = run(*AnnotateSettings.of_project(project), limit=1, concurrency=1, progress=False)
        assert len(server.requests) == 4
    assert result["done"] == 1 and result["malformed"] == {"unparseable": 1, "debris": 1}
    (row,) = records(project)
    assert row["turns"][0]["content"] == "Why did the Heron stop running?"
    assert row["turns"][1]["content"] == json.loads(good)["response"]


def test_without_structured_output_delimiters_then_two_step(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        # First reply attempt (delimited) answers without labels; the two-step fallback then succeeds.
        server.queue("How deep is Lake Marrow?", "It is deep, I suppose.")
        project = load(project_dir, server, **{"annotator.structured_output": "'off'"})
        result = run(*AnnotateSettings.of_project(project), limit=2, concurrency=1, progress=False)
        bodies = list(server.requests)
    assert result["done"] == 2 and result["malformed"] == {"missing_label": 1}
    assert not any("response_format" in body for body in bodies)
    first, second = sorted(
        records(project), key=lambda r: r["turns"][0]["content"] != "How deep is Lake Marrow?"
    )
    assert first["annotator"]["output"] == "two_step"
    assert first["turns"][1]["analysis"].startswith("The user has the number of crossings wrong")
    assert first["turns"][1]["content"].startswith("Twice in winter")
    # The second call of the fallback is the real dialogue, with the analysis in the system prompt.
    response_step = next(b for b in bodies if "Your private notes" in b["messages"][0]["content"])
    assert response_step["messages"][-1] == {"role": "user", "content": "How deep is Lake Marrow?"}
    assert second["annotator"]["output"] == "delimited"
    assert second["turns"][1]["analysis"].startswith("The premise is wrong")


def test_multi_turn_dialogues_have_follow_ups(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        project = load(
            project_dir, server, **{"annotate.multi_turn_share": 1.0, "annotate.max_follow_ups": 2}
        )
        result = run(*AnnotateSettings.of_project(project), progress=False)
        bodies = list(server.requests)
    rows = records(project)
    assert result["done"] == 8
    for row in rows:
        roles = [turn["role"] for turn in row["turns"]]
        assert len(roles) in (4, 6) and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(turn["analysis"] for turn in row["turns"] if turn["role"] == "assistant")
    follow_ups = [b for b in bodies if "Write only the visitor's next words" in user_text(b)]
    assert len(follow_ups) == sum(len(r["turns"]) // 2 - 1 for r in rows)
    assert all(
        "The conversation so far" in user_text(b) and "Ada Thorne: " in user_text(b) for b in follow_ups
    )
    # Each follow-up is answered with the whole dialogue in the prompt.
    longest = max(rows, key=lambda r: len(r["turns"]))
    last_reply = [
        b for b in bodies if b.get("response_format") and longest["turns"][-2]["content"] in user_text(b)
    ]
    assert last_reply and longest["turns"][0]["content"] in user_text(last_reply[0])


def test_planning_is_deterministic_and_grows_by_appending(project_dir: Path) -> None:
    project = load_project(project_dir / "persllm.yaml")
    retriever = Retriever.of(project)
    stages = {"ada": ["mate", "master"]}
    first = plan_items(AnnotateSettings.of(project.config), retriever.chunks, ["ada"], stages)
    again = plan_items(AnnotateSettings.of(project.config), retriever.chunks, ["ada"], stages)
    assert [i.id for i in first] == [i.id for i in again]
    assert [i.index for i in first] == [0] * 6 + [1] * 2  # interleaved: a limit takes a spread
    bigger = load_project(project_dir / "persllm.yaml", {"annotate.counts.ordinary": 5, "seed": 3})
    grown = plan_items(AnnotateSettings.of(bigger.config), retriever.chunks, ["ada"], stages)
    assert {i.id for i in first} < {i.id for i in grown} and len(grown) == 14
    reseeded = load_project(project_dir / "persllm.yaml", {"seed": 4})
    assert {
        i.id for i in plan_items(AnnotateSettings.of(reseeded.config), retriever.chunks, ["ada"], stages)
    } != {i.id for i in first}
    opinions = [i for i in grown if i.kind == "opinion"]
    assert all(i.stance in ("agree", "differ", "conflict") for i in opinions)
    assert all(i.stance == "" for i in grown if i.kind != "opinion")


def test_reply_is_public_for_regeneration_as_another_stage(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        project = load(project_dir, server)
        retriever = Retriever.of(project)
        annotator = Annotator(
            project.workspace,
            project.config.annotator,
            project.config.annotate,
            make_backend(project.config.annotator),
            retriever,
        )
        turns = [{"role": "user", "content": "Were the quay lamps electric?"}]
        reply = run_sync(annotator.reply("ada", "mate", turns, seed=None, n_sample=1))
        other = run_sync(annotator.reply("ada", "master", turns, seed=None, n_sample=1))
        bodies = list(server.requests)
    assert reply.content.startswith("I will tell you plainly") and reply.analysis and reply.output == "json"
    assert reply.context.stage == "mate" and other.context.stage == "master"
    assert "It is 1890" in user_text(bodies[0]) and "It is 1904" in user_text(bodies[1])
    assert "October 1903" in other.context.knowledge_text()
    assert "October 1903" not in reply.context.knowledge_text()  # the mate knows nothing of 1903


def test_retrieval_queue_batches_and_keeps_errors_per_request(project_dir: Path) -> None:
    import asyncio

    from persllm.annotate.retrieval import RetrievalQueue
    from persllm.errors import UserError

    project = load_project(project_dir / "persllm.yaml")
    retriever = Retriever.of(project)
    queue = RetrievalQueue(retriever)
    seed = retriever.chunks("ada", "mate")[1]
    queries = [f"How often did the Heron cross in winter, question {i}?" for i in range(12)]

    async def many() -> list[Any]:
        calls = [queue.retrieve("ada", "mate", q, seed if i % 2 else None) for i, q in enumerate(queries)]
        calls.append(queue.retrieve("ada", "no-such-stage", "x"))
        calls.append(queue.retrieve("ada", "mate", "   "))  # empty query, no seed: fails alone
        return await asyncio.gather(*calls, return_exceptions=True)

    results = run_sync(many())
    assert isinstance(results[-2], UserError) and "no-such-stage" in str(results[-2])
    assert isinstance(results[-1], UserError) and "query is empty" in str(results[-1])
    assert queue.batches < len(queries)  # concurrent requests were served together
    for i, (query, context) in enumerate(zip(queries, results, strict=False)):
        direct = retriever.retrieve("ada", "mate", query, seed if i % 2 else None)
        assert context.to_dict() == direct.to_dict()
    assert run_sync(queue.retrieve("ada", "master", "stone pier")).stage == "master"  # a new loop works


def test_retrieval_queue_on_parallel_workers_matches_direct_retrieval(project_dir: Path) -> None:
    import asyncio

    from persllm.annotate.retrieval import RetrievalQueue

    project = load_project(project_dir / "persllm.yaml")
    retriever = Retriever.of(project)
    queue = RetrievalQueue(retriever, workers=3, max_batch=4)
    seeds = retriever.chunks("ada", "mate") + retriever.chunks("ada", "master")
    asks = [(s.stage, f"What happened on the lake, question {i}?", s) for i, s in enumerate(seeds * 3)]

    async def many() -> list[Any]:
        return await asyncio.gather(*(queue.retrieve("ada", stage, q, seed) for stage, q, seed in asks))

    results = run_sync(many())
    assert queue.queries == len(asks) and queue.batches >= len(asks) / 4
    for (stage, query, seed), context in zip(asks, results, strict=True):
        assert context.to_dict() == retriever.retrieve("ada", stage, query, seed).to_dict()


def test_parallel_retrieval_workers_write_the_same_records(
    project_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from persllm.index import encoder

    with FakeOpenAI(default_reply=annotator_reply) as server:
        project = load(project_dir, server, **{"annotator.concurrency": 8})
        monkeypatch.setattr(encoder, "query_workers", lambda cfg: 1)
        first = run(*AnnotateSettings.of_project(project), progress=False)
        serial = sorted(records(project), key=lambda r: r["id"])
        shutil.rmtree(project.run_dir / "annotations")
        encoder.clear_query_cache()  # embed every query again, on three workers this time
        monkeypatch.setattr(encoder, "query_workers", lambda cfg: 3)
        again = run(*AnnotateSettings.of_project(project), progress=False)
        calls = len(server.requests)
    assert first["done"] == again["done"] == 8 and again["cached_calls"] == again["calls"]
    assert calls == first["calls"]  # the second run's calls all came from the cache
    assert sorted(records(project), key=lambda r: r["id"]) == serial


# --------------------------------------------------------------------------- the command


def cli(*args: str) -> Any:
    from persllm.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_help() -> None:
    result = cli("annotate", "--help")
    assert result.exit_code == 0
    assert "--dry-run" in result.output and "Example: persllm annotate" in result.output


def test_cli_dry_run_prints_prompts_and_calls_nothing(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        result = cli(
            "annotate", str(project_dir), "--dry-run", "--set", f"annotator.base_url={server.base_url}"
        )
        assert server.requests == []
    assert result.exit_code == 0, result.output
    out = result.output
    assert "======== user_input prompt ========" in out and "======== reply prompt ========" in out
    assert "It is 1890, aboard the steam ferry Heron" in out and "no model was called" in out
    assert "[corpus/mate/" in out  # real retrieved context with references
    assert not (project_dir / "runs" / "ferry" / "cache.sqlite").exists()
    assert not (project_dir / "runs" / "ferry" / "annotations" / "ada.jsonl").exists()


def test_cli_runs_and_reports(project_dir: Path) -> None:
    with FakeOpenAI(default_reply=annotator_reply) as server:
        url = f"annotator.base_url={server.base_url}"
        result = cli("annotate", str(project_dir), "--stage", "master", "--limit", "3", "--set", url)
        as_json = cli("annotate", str(project_dir), "--stage", "master", "--json", "--set", url)
    assert result.exit_code == 0, result.output
    assert "annotate: 3 written, 0 already done, 0 malformed" in result.output
    summary = json.loads(as_json.stdout)
    assert summary["skipped"] == 3 and summary["done"] == 1
    rows = read_jsonl(project_dir / "runs" / "ferry" / "annotations" / "ada.jsonl")
    assert len(rows) == 4 and {r["stage"] for r in rows} == {"master"}


@pytest.mark.slow
def test_cli_user_errors_exit_2(project_dir: Path) -> None:
    command = [*PERSLLM, "annotate", str(project_dir)]
    bad_stage = subprocess.run([*command, "--stage", "nope"], capture_output=True, text=True, timeout=120)
    assert (
        bad_stage.returncode == 2
        and "--stage 'nope'" in bad_stage.stderr
        and "Traceback" not in bad_stage.stderr
    )
    no_json = subprocess.run(
        [*command, "--set", "annotate.output=json", "--set", "annotator.structured_output='off'"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_json.returncode == 2 and "annotate.output" in no_json.stderr


def test_server_down_is_one_line_error(project_dir: Path) -> None:
    with FakeOpenAI() as server:
        for _ in range(40):
            server.queue(Fault(status=500))
        project = load(project_dir, server, **{"annotator.max_retries": 0})
        with pytest.raises(Exception, match="failed after 1 attempts") as info:
            run(*AnnotateSettings.of_project(project), concurrency=2, progress=False)
    assert type(info.value).__name__ == "LLMError"
    manifest = json.loads((project.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["annotate"]["status"] == "interrupted"


@pytest.mark.slow  # a fresh CLI process loads torch and the encoder first: about 30 s on a busy CPU
def test_kill_9_then_resume_writes_every_item_exactly_once(project_dir: Path) -> None:
    counts = "annotate.counts={ordinary: 6, misleading: 3, opinion: 3}"
    annotations = project_dir / "runs" / "ferry" / "annotations" / "ada.jsonl"
    with FakeOpenAI(latency=0.3, default_reply=annotator_reply) as server:
        url = f"annotator.base_url={server.base_url}"
        command = [
            *PERSLLM,
            "annotate",
            str(project_dir),
            "--concurrency",
            "2",
            "--set",
            url,
            "--set",
            counts,
        ]
        # One torch thread: on a shared, busy CPU two threads make each query embedding far slower.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if annotations.exists() and len(annotations.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        if process.stderr:
            process.stderr.close()
        written = len(read_jsonl(annotations))
        assert 3 <= written < 24
        # Resume in this process (its encoder is already loaded): the same plan, the same file.
        project = load(
            project_dir, server, **{"annotate.counts": {"ordinary": 6, "misleading": 3, "opinion": 3}}
        )
        summary = run(*AnnotateSettings.of_project(project), concurrency=4, progress=False)
    assert summary["skipped"] == written and summary["done"] == 24 - written and summary["status"] == "done"
    rows = read_jsonl(annotations, strict=True)
    planned = {
        i.id
        for i in plan_items(
            AnnotateSettings.of(project.config),
            Retriever.of(project).chunks,
            ["ada"],
            {"ada": ["mate", "master"]},
        )
    }
    assert sorted(r["id"] for r in rows) == sorted(planned)


def test_module_entry_is_importable_without_cycles() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import persllm.config.annotate, persllm.config, persllm.annotate.run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
