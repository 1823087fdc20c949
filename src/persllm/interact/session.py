"""The chat session: history, stage, slash commands and streamed replies, with no terminal in it.

``persllm chat`` is a thin loop around ``ChatSession``: it reads a line, hands commands to
``command`` and anything else to ``reply``, and prints what comes back.
"""

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm.config import PersonaConfig
from persllm.errors import UserError
from persllm.interact.models import Speaker
from persllm.interact.prompting import ThinkSplitter, fit, persona_system
from persllm.layout import write_atomic
from persllm.llm.base import Message
from persllm.prompting import split_inline

# (persona id, stage id, query) -> (knowledge text, style text)
RetrieveFn = Callable[[str, str, str], tuple[str, str]]

HELP = """Commands:
  /stage S            switch to stage S ({stages})
  /analysis on|off    show or hide the model's analysis before each reply
  /reset              forget the conversation so far
  /save FILE          write the transcript (FILE.md for Markdown, anything else JSON)
  /help               this text
  /quit               leave"""


@dataclass
class CommandResult:
    """What a slash command answered, and whether the chat should end."""

    text: str
    quit: bool = False


class ChatSession:
    """One conversation with one persona model.

    Args:
        persona: the persona spoken to.
        stage: its stage id at the start (``/stage`` changes it).
        speaker: the model (see ``ModelPool.speaker``); its stage label is replaced on ``/stage``.
        context_tokens: prompt budget; the oldest turns are dropped to fit, the system prompt stays.
        params: sampling parameters (OpenAI names).
        show_analysis: yield the analysis as well as the response.
        retrieve: optional retrieval of persona material for each user message.
    """

    def __init__(
        self,
        persona: PersonaConfig,
        stage: str,
        speaker: Speaker,
        *,
        context_tokens: int = 2048,
        params: dict[str, Any] | None = None,
        show_analysis: bool = False,
        retrieve: RetrieveFn | None = None,
        model_id: str = "",
    ) -> None:
        self.persona = persona
        self.stage = persona.stage(stage).id
        self.speaker = speaker
        self.trained = speaker.label is not None
        self.context_tokens = context_tokens
        self.params = dict(params or {})
        self.show_analysis = show_analysis
        self.retrieve = retrieve
        self.model_id = model_id
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ prompt

    @property
    def label(self) -> str | None:
        return self.persona.stage(self.stage).label if self.trained else None

    def messages(self, user_text: str) -> list[Message]:
        """The prompt for the next reply: system prompt, the turns that fit, the new user message."""
        knowledge, style = (
            self.retrieve(self.persona.id, self.stage, user_text) if self.retrieve else ("", "")
        )
        text = persona_system(self.persona, self.stage, knowledge, style, self.speaker.system_style)
        system = {"role": "system", "content": text}
        turns = [{"role": t["role"], "content": t["content"]} for t in self.history]
        turns.append({"role": "user", "content": user_text})
        return fit([system, *turns], self.speaker.count_tokens, self.context_tokens, self.label)

    # ------------------------------------------------------------------ replies

    async def reply(self, user_text: str) -> AsyncIterator[tuple[str, str]]:
        """Stream the reply to ``user_text`` as ``("analysis" | "response", text)`` pieces.

        The analysis is only yielded when ``show_analysis`` is on. The turn joins the history (the
        response only, as at training time) once the stream has ended.
        """
        messages = self.messages(user_text)
        started = time.perf_counter()
        splitter, pieces = ThinkSplitter(), []
        async for piece in self.speaker.stream(messages, self.params):
            pieces.append(piece)
            for kind, text in zip(("analysis", "response"), splitter.feed(piece), strict=True):
                if text and (kind == "response" or self.show_analysis):
                    yield kind, text
        for kind, text in zip(("analysis", "response"), splitter.finish(), strict=True):
            if text and (kind == "response" or self.show_analysis):
                yield kind, text
        analysis, response = split_inline("".join(pieces))
        self.history.append({"role": "user", "content": user_text, "stage": self.stage})
        turn = {"role": "assistant", "content": response, "analysis": analysis, "stage": self.stage}
        self.history.append({**turn, "seconds": round(time.perf_counter() - started, 3)})

    async def ask(self, user_text: str) -> str:
        """The whole response to ``user_text`` (no streaming)."""
        return "".join([text async for kind, text in self.reply(user_text) if kind == "response"])

    # ------------------------------------------------------------------ commands

    @staticmethod
    def is_command(line: str) -> bool:
        return line.strip().startswith("/")

    def command(self, line: str) -> CommandResult:
        """Run one slash command; a mistake in it is answered, never raised."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if name == "/stage":
                return self._stage(arg)
            if name == "/analysis":
                return self._analysis(arg)
            if name == "/reset":
                self.history.clear()
                return CommandResult("conversation cleared")
            if name == "/save":
                return self._save(arg)
            if name == "/help":
                return CommandResult(self.help())
            if name in ("/quit", "/exit"):
                return CommandResult("bye", quit=True)
        except UserError as exc:
            return CommandResult(f"error: {exc}")
        return CommandResult(f"unknown command {name!r}; /help lists the commands")

    def help(self) -> str:
        return HELP.format(stages=", ".join(s.id for s in self.persona.stages))

    def _stage(self, arg: str) -> CommandResult:
        if not arg:
            stages = ", ".join(s.id for s in self.persona.stages)
            return CommandResult(f"stage is {self.stage}; /stage S switches to one of: {stages}")
        self.stage = self.persona.stage(arg).id
        return CommandResult(f"stage is now {self.stage}: {self.persona.stage(arg).time}")

    def _analysis(self, arg: str) -> CommandResult:
        if arg not in ("on", "off"):
            return CommandResult("usage: /analysis on|off")
        self.show_analysis = arg == "on"
        return CommandResult(f"analysis {'shown' if self.show_analysis else 'hidden'}")

    def _save(self, arg: str) -> CommandResult:
        if not arg:
            return CommandResult("usage: /save FILE (FILE.md for Markdown, anything else JSON)")
        path = Path(arg).expanduser()
        try:
            self.save(path)
        except OSError as exc:
            return CommandResult(f"error: {path}: cannot write ({exc.strerror}); choose another file")
        return CommandResult(f"saved {len(self.history) // 2} exchanges to {path}")

    # ------------------------------------------------------------------ transcript

    def transcript(self) -> dict[str, Any]:
        return {
            "persona": self.persona.id,
            "name": self.persona.name,
            "model": self.model_id,
            "stage": self.stage,
            "turns": self.history,
        }

    def save(self, path: Path) -> None:
        """Write the transcript atomically: Markdown for ``.md``/``.markdown``, JSON otherwise."""
        if path.suffix.lower() in (".md", ".markdown"):
            text = transcript_markdown(self.transcript())
        else:
            text = json.dumps(self.transcript(), ensure_ascii=False, indent=2) + "\n"
        write_atomic(path, text)


def transcript_markdown(data: dict[str, Any]) -> str:
    lines = [f"# Chat with {data['name']}", "", f"Model: `{data['model'] or data['persona']}`", ""]
    for turn in data["turns"]:
        who = "You" if turn["role"] == "user" else data["name"]
        lines.append(f"**{who}** ({turn['stage']}):")
        lines.append("")
        if turn.get("analysis"):
            lines += ["<details><summary>analysis</summary>", "", turn["analysis"], "", "</details>", ""]
        lines += [turn["content"], ""]
    return "\n".join(lines)
