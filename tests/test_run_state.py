"""The run folder keeps its state: one writer at a time, no lost manifest update, a partial stage is never
taken for done, torn checkpoints are skipped, settings are checked before the first stage, and Ctrl-C or
SIGTERM stops a run within seconds with the manifest saying so."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from persllm import pipeline
from persllm.config import load_project
from persllm.config.stages import SFTSettings
from persllm.errors import PartialStage, UserError
from persllm.jsonl import read_jsonl
from persllm.layout import project_lock
from persllm.manifest import load_manifest, record_stage
from tests.fake_openai import FakeOpenAI, Fault
from tests.test_cli_project import run_main
from tests.test_pipeline import pipeline_project, scripted_annotator, write_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # subprocesses, signals and a pipeline per test: `make test-fast` skips it

PERSLLM = Path(sys.executable).parent / "persllm"


def _updates(config: str, writer: int, count: int) -> None:
    project = load_project(config)
    for number in range(count):
        record_stage(project.workspace, f"writer{writer}", **{f"update{number}": number})


def test_two_writers_lose_no_manifest_update(pipeline_project: Path) -> None:  # noqa: F811
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_updates, args=(str(pipeline_project), w, 300)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    manifest = json.loads((load_project(pipeline_project).layout.manifest).read_text())  # valid JSON
    for writer in range(2):
        entry = manifest["stages"][f"writer{writer}"]
        assert [entry[f"update{n}"] for n in range(300)] == list(range(300))
    assert not list(load_project(pipeline_project).run_dir.glob("*.tmp"))


def test_a_broken_manifest_is_one_line(pipeline_project: Path) -> None:  # noqa: F811
    project = load_project(pipeline_project)
    project.layout.root.mkdir(parents=True)
    project.layout.manifest.write_text('{"stages": {')
    with pytest.raises(UserError, match=r"manifest\.json: not valid JSON .*; restore it or move it aside"):
        load_manifest(project.run_dir)


HOLD = """
import sys, time
from persllm.config import load_project
from persllm.layout import project_lock
with project_lock(load_project(sys.argv[1]).layout, "annotate"):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_writer_is_refused_with_the_holder_or_waits(
    pipeline_project: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(pipeline_project), "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        code, _, err = run_main(["curate", str(pipeline_project)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"in use by `persllm annotate` (pid {holder.pid}, since " in err and "--wait" in err
        started = time.monotonic()
        # --wait queues behind the holder (curate then fails on its own: nothing is annotated yet).
        code, out, err = run_main(["curate", str(pipeline_project), "--wait"], capsys)
        assert time.monotonic() - started > 1 and "waiting for `persllm annotate`" in out
        assert code == 2 and "run `persllm annotate` first" in err
    finally:
        holder.wait(timeout=30)
    # The same process may take the lock again (a command's own stages), and a finished holder frees it.
    layout = load_project(pipeline_project).layout
    with project_lock(layout, "run"), project_lock(layout, "annotate"):
        pass


# --------------------------------------------------------------------------- partial is never done


class Picky(FakeOpenAI):
    """A server that answers 500 to every request ``fails(body)`` says so, whatever the queue holds."""

    def __init__(self, fails: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fails = fails

    def _record_and_pop(self, body: dict[str, Any], headers: dict[str, str]) -> Any:
        scripted = super()._record_and_pop(body, headers)
        return Fault(status=500) if self.fails(body) else scripted


def about_young_jonah(body: dict[str, Any]) -> bool:
    """Requests for Jonah's first stage: a few items, fewer than the run's "server is down" limit."""
    text = json.dumps(body["messages"])
    return "Jonah" in text and "schoolmaster" in text


def flaky_project(pipeline_project: Path, base: Path, url: str) -> Any:  # noqa: F811
    write_config(pipeline_project, base, url)
    raw = yaml.safe_load(pipeline_project.read_text())
    raw["annotator"]["max_retries"] = 0
    pipeline_project.write_text(yaml.safe_dump(raw))
    return load_project(pipeline_project)


def test_a_partial_annotation_is_tried_again_then_stops_with_exit_3_and_is_filled_later(
    pipeline_project: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    with Picky(about_young_jonah, default_reply=scripted_annotator) as server:
        project = flaky_project(pipeline_project, tmp_path / "base", server.base_url)
        # Every request about young Jonah fails, in the first try and in the second: his items stay missing.
        with pytest.raises(
            PartialStage, match=r"annotate: \d+ of \d+ items still missing after a second try"
        ):
            pipeline.run(project, stop="curate")
        manifest = load_manifest(project.run_dir)
        assert (
            manifest["pipeline"]["annotate"]["status"] == "partial" and "curate" not in manifest["pipeline"]
        )
        failures = read_jsonl(project.layout.failures("annotate"))
        assert failures and all(f["reason"].startswith("model error") and not f["given_up"] for f in failures)
        assert {(f["persona"], f["stage"]) for f in failures} == {("jonah", "schoolmaster")}
        missing = len(failures)

        # A healthy server: the next run asks only about the missing items, then goes on.
        server.fails = lambda body: False
        before = len(server.requests)
        results = pipeline.run(load_project(pipeline_project), stop="curate")
        assert {r.name: r.status for r in results} == {
            "index": "skipped",
            "annotate": "resumed",
            "curate": "ran",
        }
        asked = server.requests[before:]
        assert len(asked) >= missing and all(about_young_jonah(body) for body in asked)
        assert read_jsonl(project.layout.failures("annotate")) == []
        assert load_manifest(project.run_dir)["pipeline"]["annotate"]["status"] == "done"


def test_one_more_try_fills_a_few_failed_items_within_the_same_run(
    pipeline_project: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    with FakeOpenAI(default_reply=scripted_annotator) as server:
        project = flaky_project(pipeline_project, tmp_path / "base", server.base_url)
        server.queue(*[Fault(status=500)] * 3)
        results = pipeline.run(project, stop="annotate")
        assert results[-1].counts["status"] == "done" and results[-1].counts["missing"] == 0
        assert len(read_jsonl(project.layout.dialogues("elsie"))) == 8


def test_allow_partial_goes_on_and_the_manifest_says_so(
    pipeline_project: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Picky(about_young_jonah, default_reply=scripted_annotator) as server:
        project = flaky_project(pipeline_project, tmp_path / "base", server.base_url)
        pipeline.run(project, stop="annotate", allow_partial=True)
        entry = load_manifest(project.run_dir)["pipeline"]["annotate"]
        assert entry["status"] == "done" and entry["allowed_partial"] is True
        assert entry["counts"]["missing"] > 0
        code, out, _ = run_main(["failures", str(pipeline_project)], capsys)
        assert code == 0 and "model error" in out and f"{entry['counts']['missing']} missing" in out


# --------------------------------------------------------------------------- checked before the first stage


def test_run_checks_every_setting_before_the_first_stage(
    pipeline_project: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_config(pipeline_project, tmp_path / "base", "http://127.0.0.1:9/v1")
    for option, message in [
        ("sft.trl.learnin_rate=0.1", r"sft\.trl\.learnin_rate: unknown TRL SFTConfig argument; did you mean"),
        ("eval.systems=[prompt,sfd]", r"eval\.systems: unknown system 'sfd'"),
        ("base_model.model=./nowhere", r"persllm\.yaml: base_model\.model: /\S+/nowhere does not exist"),
    ]:
        code, _, err = run_main(["run", str(pipeline_project), "--set", option], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert pytest.importorskip("re").search(message, err), err
        assert not (load_project(pipeline_project).run_dir / "index").exists()  # nothing ran


def test_model_paths_are_relative_to_the_config_file(
    pipeline_project: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    shutil.copytree(tmp_path / "base", pipeline_project.parent / "models" / "base")
    raw = yaml.safe_load(pipeline_project.read_text())
    raw["base_model"] = {"backend": "transformers", "model": "models/base"}
    pipeline_project.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    project = load_project(pipeline_project)
    assert project.config.base_model.model == str((pipeline_project.parent / "models" / "base").resolve())
    raw["base_model"]["model"] = "./models/gone"
    pipeline_project.write_text(yaml.safe_dump(raw))
    gone = load_project(pipeline_project)
    assert gone.config.base_model.model == str(pipeline_project.parent.resolve() / "models" / "gone")
    with pytest.raises(
        UserError, match=rf"{pipeline_project}: base_model\.model: \S+/models/gone does not exist"
    ):
        pipeline.run(gone, stop="sft")


def test_an_empty_stage_and_an_oversized_file_are_one_line(
    pipeline_project: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    corpus = pipeline_project.parent / "corpus" / "elsie"
    stage = next(corpus.iterdir())
    for path in stage.iterdir():
        path.write_text("\n\n   \n")
    code, _, err = run_main(["index", str(pipeline_project)], capsys)
    assert code == 2 and f"stage {stage.name!r}: its files hold no text" in err
    (stage / "style.txt").write_text("word " * 300_000)  # 1.5 MB
    code, _, err = run_main(["index", str(pipeline_project), "--set", "corpus.max_file_mb=1"], capsys)
    assert code == 2 and "MB is over corpus.max_file_mb (1.0 MB); split it" in err
    assert not (load_project(pipeline_project).layout.index / "elsie").exists()


# --------------------------------------------------------------------------- checkpoints


def test_resume_skips_a_torn_checkpoint_and_a_finished_model_drops_its_checkpoints(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from persllm.train import common, sft
    from tests.test_train import DPO_TRL, SFT_TRL, make_project

    trl = {**SFT_TRL, "max_steps": 3, "save_steps": 1, "logging_steps": 1, "save_total_limit": 3}
    config = make_project(tmp_path, shutil.copytree(tiny_model_dir, tmp_path / "base"), trl, DPO_TRL)
    project = load_project(config, {"sft.keep_checkpoints": True})
    sft.run(*SFTSettings.of_project(project), "elsie")
    _, checkpoints = common.model_dirs(project.layout, "elsie", "sft")
    (checkpoints / "checkpoint-3" / "trainer_state.json").unlink()  # killed while saving
    assert common.checkpoint_to_resume(checkpoints, resume=True) == str(checkpoints / "checkpoint-2")
    assert "checkpoint-3 is incomplete" in capsys.readouterr().out
    info = sft.run(*SFTSettings.of_project(project), "elsie", resume=True)
    assert info["resumed_from"].endswith("checkpoint-2") and info["steps"] == 3
    # Without keep_checkpoints, the finished model's checkpoints are removed.
    sft.run(*SFTSettings.of_project(load_project(config)), "elsie")
    assert (
        not checkpoints.exists() and (project.layout.model("elsie", "sft") / "adapter_config.json").exists()
    )


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM


def interrupt(command: list[str], ready: str, sig: int, cwd: Path) -> tuple[int, float, str]:
    """Start ``persllm COMMAND``; once ``ready`` shows on stderr, send ``sig``: (exit code, seconds to
    exit after the signal, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [str(PERSLLM), *command],
        cwd=cwd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    seen = ""
    deadline = time.monotonic() + 240
    while ready not in seen:
        line = process.stderr.readline()
        assert line or process.poll() is None, seen
        seen += line
        assert time.monotonic() < deadline, seen
    time.sleep(1.5)  # well inside the work
    process.send_signal(sig)
    sent = time.monotonic()
    rest = process.communicate(timeout=60)[1]
    return process.returncode, time.monotonic() - sent, seen + rest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_annotation_within_seconds_and_the_run_resumes(
    pipeline_project: Path,  # noqa: F811
    tmp_path: Path,
    sig: int,
) -> None:
    with FakeOpenAI(default_reply=scripted_annotator, latency=20.0) as server:
        write_config(pipeline_project, tmp_path / "base", server.base_url)
        code, seconds, err = interrupt(["run", str(pipeline_project)], "[annotate] running", sig, tmp_path)
        assert code == 130 and seconds < 5, (seconds, err)
        assert "interrupted; everything finished so far is saved" in err and "Traceback" not in err
        project = load_project(pipeline_project)
        manifest = load_manifest(project.run_dir)
        assert manifest["pipeline"]["annotate"]["status"] == "interrupted"
        assert manifest["stages"]["annotate"]["status"] == "interrupted"
        server.latency = 0.0
        results = pipeline.run(project, stop="annotate")
        assert results[-1].status == "resumed" and results[-1].counts["status"] == "done"


def test_ctrl_c_stops_evaluation_within_seconds(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.test_eval_e2e import setup

    project = setup(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(project.config_path.read_text())
    # Long replies: 96 rows of up to 900 tokens, about 20 s of generation on 2 cores.
    raw["eval"] = {**raw.get("eval", {}), "params": {"temperature": 0.9, "max_tokens": 900}, "samples": 12}
    project.config_path.write_text(yaml.safe_dump(raw))
    command = ["eval", str(project.config_path), "--systems", "prompt"]
    code, seconds, err = interrupt(command, "eval: 96 answers from prompt", signal.SIGINT, tmp_path)
    assert code == 130 and seconds < 5, (seconds, err)
    assert load_manifest(project.run_dir)["stages"]["eval"]["status"] in ("running", "interrupted")


@pytest.mark.slow
def test_ctrl_c_stops_llamacpp_annotation_within_seconds(example_project: Path, tmp_path: Path) -> None:
    """The demo's annotator: 16 llama.cpp slots computing long replies in the engine's own threads."""
    options = ["--set", "annotator.params.max_tokens=512", "--set", "annotate.own_words_share={}"]
    command = ["run", str(example_project), "--to", "annotate", *options]
    code, seconds, err = interrupt(command, "[annotate] running", signal.SIGINT, tmp_path)
    assert code == 130 and seconds < 5, (seconds, err)
    manifest = load_manifest(load_project(example_project).run_dir)
    assert manifest["stages"]["annotate"]["status"] == "interrupted"
    assert manifest["pipeline"]["annotate"]["status"] == "interrupted"
