"""``persllm logs`` end to end: calls through the cache against the scripted server, then the CLI."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from persllm.cli import app
from persllm.config import load_project
from persllm.llm import LLMConfig, make_backend, open_cache, run_sync
from tests.fake_openai import FakeOpenAI

runner = CliRunner()


LONG_REPLY = "The lamp must be trimmed before dusk, every single night, whatever the weather brings in."


def fill_log(config: Path) -> None:
    project = load_project(config)

    def reply(body: dict[str, Any]) -> str:
        return LONG_REPLY if "lamp" in str(body["messages"]) else "Short answer."

    with FakeOpenAI(default_reply=reply) as server:
        cfg = LLMConfig(backend="openai", model="fake-model", base_url=server.base_url)
        llm = make_backend(cfg, open_cache(project), tag="annotate")
        run_sync(llm.generate([{"role": "user", "content": "first question"}], {}))
        run_sync(llm.generate([{"role": "user", "content": "tell me about the lamp"}], {}))
        run_sync(llm.generate([{"role": "user", "content": "first question"}], {"tag": "evaluate"}))


def test_logs_lists_recent_calls_newest_first(example_project: Path) -> None:
    fill_log(example_project)
    result = runner.invoke(app, ["logs", str(example_project)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("2 calls answered, 1 served from the cache")
    rows = lines[1:]
    assert len(rows) == 3
    assert "cached" in rows[0] and "Short answer." in rows[0]
    assert "model" in rows[1] and "fake-model" in rows[1] and "openai" in rows[1]
    assert rows[1].endswith("  " + LONG_REPLY[:60] + "…")

    two = runner.invoke(app, ["logs", str(example_project), "-n", "2", "--json"])
    records = [json.loads(line) for line in two.output.strip().splitlines()]
    assert [r["cached"] for r in records] == [True, False]
    assert records[0]["tag"] == "evaluate" and records[1]["tag"] == "annotate"
    assert records[1]["request"]["messages"] == [{"role": "user", "content": "tell me about the lamp"}]

    tagged = runner.invoke(app, ["logs", str(example_project), "--tag", "annotate", "--json"])
    assert len(tagged.output.strip().splitlines()) == 2


def test_logs_without_calls_says_so(example_project: Path) -> None:
    result = runner.invoke(app, ["logs", str(example_project)])
    assert result.exit_code == 0
    assert "no calls logged yet" in result.output
    assert not (load_project(example_project).run_dir / "cache.sqlite").exists()


def test_logs_help_and_bad_config(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "persllm")
    result = subprocess.run([exe, "logs", "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "Example: persllm logs" in result.stdout and "--json" in result.stdout
    missing = subprocess.run([exe, "logs", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")
