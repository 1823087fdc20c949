"""ChatSession and `persllm chat` on the tiny model with real LoRA adapters (and a scripted endpoint for
a model that writes an analysis)."""

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from persllm.config import Project, load_project
from persllm.config.llm import LLMConfig
from persllm.config.stages import IndexSettings
from persllm.interact import chat
from persllm.interact.models import ModelPool, Speaker, chat_ref
from persllm.interact.session import ChatSession
from persllm.llm.openai_backend import OpenAIBackend
from tests.fake_openai import FakeOpenAI
from tests.test_chat_project import build_project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Project:
    return load_project(build_project(tmp_path_factory.mktemp("chat"), tiny_model_dir))


@pytest.fixture(scope="module")
def pool(project: Project) -> ModelPool:
    return ModelPool(project)


def session(project: Project, pool: ModelPool, stage: str = "engineer", **kwargs: object) -> ChatSession:
    ref = chat_ref(project, "elsie", stage, "sft")
    return ChatSession(project.persona("elsie"), stage, pool.speaker(ref), model_id=ref.id, **kwargs)  # type: ignore[arg-type]


def collect(chat_session: ChatSession, text: str) -> list[tuple[str, str]]:
    async def run() -> list[tuple[str, str]]:
        return [piece async for piece in chat_session.reply(text)]

    return asyncio.run(run())


def test_reply_streams_and_joins_history(project: Project, pool: ModelPool) -> None:
    chat_session = session(project, pool)
    prompt = chat_session.messages("Who keeps the light?")
    assert prompt[0]["role"] == "system" and "Elsie Wren" in prompt[0]["content"]
    assert "It is 1905, in Carrow Bay." in prompt[0]["content"]
    assert prompt[1] == {"role": "user", "content": "<TIME-II> Who keeps the light?"}
    pieces = collect(chat_session, "Who keeps the light?")
    assert pieces and all(kind == "response" for kind, _ in pieces)
    reply = "".join(text for _, text in pieces)
    assert reply.strip()
    assert [t["role"] for t in chat_session.history] == ["user", "assistant"]
    assert chat_session.history[1]["content"] == reply.strip()
    second = chat_session.messages("And the weather?")
    assert second[1]["content"] == "<TIME-II> Who keeps the light?"  # the label stays on the first turn
    assert second[2] == {"role": "assistant", "content": reply.strip()}


def test_history_is_trimmed_to_the_token_budget(project: Project, pool: ModelPool) -> None:
    chat_session = session(project, pool, context_tokens=400)
    for i in range(6):
        chat_session.history += [
            {
                "role": "user",
                "content": f"Question number {i} about the lamp and the sea.",
                "stage": "engineer",
            },
            {
                "role": "assistant",
                "content": "The lamp burns oil every night of the year.",
                "stage": "engineer",
            },
        ]
    prompt = chat_session.messages("What now?")
    speaker = chat_session.speaker
    assert speaker.count_tokens(prompt) <= 400
    assert prompt[0]["role"] == "system"
    assert prompt[-1]["content"] == "What now?"
    assert prompt[1]["role"] == "user" and prompt[1]["content"].startswith("<TIME-II> Question number")
    assert len(prompt) < 14  # older turns were dropped
    assert "Question number 5" in prompt[-3]["content"]  # the newest ones stayed


def test_slash_commands(project: Project, pool: ModelPool, tmp_path: Path) -> None:
    chat_session = session(project, pool)
    assert ChatSession.is_command("/help") and not ChatSession.is_command("hello /x")
    help_text = chat_session.command("/help").text
    for name in ("/stage", "/analysis", "/reset", "/save", "/help", "/quit"):
        assert name in help_text
    assert "keeper, engineer" in help_text

    result = chat_session.command("/stage keeper")
    assert chat_session.stage == "keeper" and "1889" in result.text
    assert chat_session.messages("hi")[1]["content"] == "<TIME-I> hi"
    assert "1889" in chat_session.messages("hi")[0]["content"]
    assert "error" in chat_session.command("/stage moon").text and chat_session.stage == "keeper"
    assert "stage is keeper" in chat_session.command("/stage").text

    assert chat_session.command("/analysis on").text == "analysis shown" and chat_session.show_analysis
    assert chat_session.command("/analysis off").text == "analysis hidden" and not chat_session.show_analysis
    assert chat_session.command("/analysis maybe").text.startswith("usage")

    collect(chat_session, "Who keeps the light?")
    json_path, md_path = tmp_path / "t.json", tmp_path / "sub" / "t.md"
    assert "1 exchanges" in chat_session.command(f"/save {json_path}").text
    saved = json.loads(json_path.read_text(encoding="utf-8"))
    assert saved["persona"] == "elsie" and saved["model"] == "elsie:engineer:sft"
    assert [t["role"] for t in saved["turns"]] == ["user", "assistant"]
    assert saved["turns"][0]["stage"] == "keeper"
    chat_session.command(f"/save {md_path}")
    markdown = md_path.read_text(encoding="utf-8")
    assert markdown.startswith("# Chat with Elsie Wren") and "Who keeps the light?" in markdown
    assert chat_session.command("/save").text.startswith("usage")
    assert "cannot write" in chat_session.command(f"/save {tmp_path}").text  # a folder

    assert chat_session.command("/reset").text == "conversation cleared" and chat_session.history == []
    assert "unknown command" in chat_session.command("/dance").text
    assert chat_session.command("/quit").quit and not chat_session.command("/help").quit


ANALYSED = "<think>\nThe user asks about the lamp. I keep it.\n</think>\nThe lamp burns paraffin."


def test_analysis_shown_or_hidden_with_a_reasoning_model(project: Project) -> None:
    with FakeOpenAI(default_reply=ANALYSED, stream_delay=0.001) as server:
        backend = OpenAIBackend(LLMConfig(backend="openai", base_url=server.base_url, model="m"))
        chat_session = ChatSession(project.persona("elsie"), "keeper", Speaker(backend))
        hidden = collect(chat_session, "Tell me about the lamp.")
        assert "".join(t for _, t in hidden) == "The lamp burns paraffin."
        assert {kind for kind, _ in hidden} == {"response"}
        chat_session.command("/analysis on")
        shown = collect(chat_session, "Again?")
        kinds = [kind for kind, _ in shown]
        assert kinds.index("response") > kinds.index("analysis")  # the analysis comes first
        assert (
            "".join(t for k, t in shown if k == "analysis").strip()
            == "The user asks about the lamp. I keep it."
        )
        assert chat_session.history[-1]["analysis"] == "The user asks about the lamp. I keep it."
        assert chat_session.history[-1]["content"] == "The lamp burns paraffin."
        # an untrained model gets no stage label; earlier replies go back without their analysis
        sent = server.requests[-1]["messages"]
        assert sent[1]["content"] == "Tell me about the lamp."
        assert sent[2] == {"role": "assistant", "content": "The lamp burns paraffin."}


def test_terminal_loop(project: Project, tmp_path: Path) -> None:
    out = io.StringIO()
    saved = tmp_path / "chat.md"
    stdin = io.StringIO(
        f"Who keeps the light?\n\n/analysis on\n/stage keeper\nAnd now?\n/save {saved}\n/quit\nignored\n"
    )
    result = chat.run(project, "elsie", "engineer", "sft", stdin=stdin, stdout=out)
    text = out.getvalue()
    assert text.startswith("Chatting with Elsie Wren (elsie:engineer:sft, stage engineer)")
    assert text.count("Elsie Wren> ") == 2
    assert "analysis shown" in text and "stage is now keeper" in text and text.rstrip().endswith("bye")
    assert [t["stage"] for t in result.history] == ["engineer", "engineer", "keeper", "keeper"]
    assert saved.exists()


def test_retrieval_adds_persona_material(project: Project, pool: ModelPool) -> None:
    from persllm.index.run import run as build_index

    build_index(*IndexSettings.of_project(project), ["elsie"])
    chat_session = session(project, pool, retrieve=chat.retriever(project))
    system = chat_session.messages("Tell me about the lamp.")[0]["content"]
    assert "What you know at this point in your life:" in system
    # The persona's own material, without the file paths the annotator is shown.
    assert "paraffin" in system and "knowledge.md" not in system


def test_cli_chat_and_help(project: Project) -> None:
    from persllm.cli import app

    runner = CliRunner()
    help_result = runner.invoke(app, ["chat", "--help"])
    assert help_result.exit_code == 0 and "Example:" in help_result.output
    result = runner.invoke(
        app,
        ["chat", str(project.config_path), "--persona", "jonah", "--stage", "mayor"],
        input="Hello?\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    assert "Chatting with Jonah Pell (jonah:mayor:sft" in result.output and "Jonah Pell> " in result.output


@pytest.mark.slow
def test_cli_user_errors_exit_2(project: Project) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "persllm.cli", "chat", str(project.config_path)]
    for extra, expected in (
        (["--persona", "nobody"], "no persona 'nobody'"),
        (["--persona", "elsie", "--stage", "moon"], "no stage 'moon'"),
        (["--persona", "elsie", "--model", "dpo"], "--model dpo"),
    ):
        done = subprocess.run(
            [*base, *extra], capture_output=True, text=True, input="", env=env, timeout=120, check=False
        )
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
    assert sys.executable  # the subprocess used the project's venv, not this interpreter
