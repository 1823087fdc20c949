"""``persllm chat``: the terminal loop around a ``ChatSession``."""

import asyncio
import sys
from typing import TextIO

from persllm.config import Project
from persllm.index.retrieve import Retriever
from persllm.interact.models import ModelPool, best_variant, chat_ref
from persllm.interact.session import ChatSession, RetrieveFn


def run(
    project: Project,
    persona: str,
    stage: str | None = None,
    model: str | None = None,
    show_analysis: bool | None = None,
    retrieval: bool | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> ChatSession:
    """Chat with ``persona`` on ``stdin``/``stdout`` until /quit or end of input; returns the session."""
    cfg = project.config.serve
    spec = project.persona(persona)
    stage_id = spec.stage(stage).id if stage else spec.stages[-1].id
    ref = chat_ref(project, persona, stage_id, model or best_variant(project, persona))
    pool = ModelPool(project)
    session = ChatSession(
        spec,
        stage_id,
        pool.speaker(ref),
        context_tokens=cfg.context_tokens,
        params=cfg.params,
        show_analysis=cfg.show_analysis if show_analysis is None else show_analysis,
        retrieve=retriever(project) if (cfg.retrieval if retrieval is None else retrieval) else None,
        model_id=ref.id,
    )
    asyncio.run(_loop(session, pool, stdin or sys.stdin, stdout or sys.stdout))
    return session


def retriever(project: Project) -> RetrieveFn:
    """Retrieval of the persona's own material for a message, as (knowledge, style) text."""

    index = Retriever.of(project)

    def retrieve(persona: str, stage: str, query: str) -> tuple[str, str]:
        context = index.retrieve(persona, stage, query)
        return context.knowledge_text(sources=False), context.style_text(sources=False)

    return retrieve


async def _loop(session: ChatSession, pool: ModelPool, stdin: TextIO, stdout: TextIO) -> None:
    name = session.persona.name
    _say(stdout, f"Chatting with {name} ({session.model_id}, stage {session.stage}). /help for commands.\n")
    try:
        while True:
            _say(stdout, "you> ")
            line = await asyncio.to_thread(stdin.readline)
            if not line:  # end of input
                _say(stdout, "\n")
                break
            if not line.strip():
                continue
            if session.is_command(line):
                result = session.command(line)
                _say(stdout, result.text + "\n")
                if result.quit:
                    break
                continue
            await _print_reply(session, line.strip(), stdout)
    finally:
        await pool.aclose()


async def _print_reply(session: ChatSession, text: str, stdout: TextIO) -> None:
    shown = None
    async for kind, piece in session.reply(text):
        if kind != shown:
            _say(
                stdout,
                ("\n" if shown else "")
                + ("(analysis) " if kind == "analysis" else f"{session.persona.name}> "),
            )
            shown = kind
        _say(stdout, piece)
    _say(stdout, "\n" if shown else f"{session.persona.name}> (no reply)\n")


def _say(stdout: TextIO, text: str) -> None:
    stdout.write(text)
    stdout.flush()
