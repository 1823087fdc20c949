"""Pure prompt building shared by chat, serve and converse.

The persona's system prompt and the stage label come from ``persllm.prompting`` so a model is
prompted exactly as it was trained; this module adds what only interaction needs: retrieved context,
trimming a long conversation to the prompt budget, and splitting a streamed reply into its analysis
and its response as the text arrives.
"""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from persllm.prompting import THINK_CLOSE, THINK_OPEN, read_template, system_prompt, with_label

if TYPE_CHECKING:
    from persllm.config import PersonaConfig, StageConfig
    from persllm.prompting import SystemStyle

PROMPTS = Path(__file__).with_name("prompts")
Message = dict[str, str]


def template(name: str) -> str:
    """A prompt template of ``interact/prompts/`` (``str.format`` placeholders)."""
    return read_template(PROMPTS, name)


def persona_system(
    persona: "PersonaConfig",
    stage: "StageConfig | str",
    knowledge: str = "",
    style: str = "",
    prompt_style: "SystemStyle" = "full",
) -> str:
    """The persona's training-time system prompt (``prompt_style``: the model's, see ``ModelRef``),
    plus retrieved material when there is any."""
    text = system_prompt(persona, stage, prompt_style)
    if knowledge.strip() or style.strip():
        block = template("retrieval.txt").format(
            knowledge=knowledge.strip() or "-", style=style.strip() or "-"
        )
        text = f"{text}\n\n{block.strip()}"
    return text


def label_first_user(messages: list[Message], label: str | None) -> list[Message]:
    """A copy of ``messages`` whose first user turn starts with the stage ``label`` (as in training)."""
    out = [dict(message) for message in messages]
    if not label:
        return out
    for message in out:
        if message["role"] == "user":
            if not message["content"].lstrip().startswith(label):
                message["content"] = with_label(message["content"], label)
            break
    return out


def merge_consecutive(messages: list[Message]) -> list[Message]:
    """Join neighbouring messages of the same role (chat templates expect alternating turns)."""
    out: list[Message] = []
    for message in messages:
        if out and out[-1]["role"] == message["role"] and message["role"] != "system":
            out[-1] = {"role": message["role"], "content": f"{out[-1]['content']}\n\n{message['content']}"}
        else:
            out.append(dict(message))
    return out


def trim_to_budget(
    messages: list[Message], count: Callable[[list[Message]], int], budget: int, pinned: int = 0
) -> list[Message]:
    """Drop the oldest turns until ``count(messages) <= budget``.

    The leading system messages and the ``pinned`` messages after them stay, and so does the last
    message; what remains after the kept head starts with a user turn. If even that is over the
    budget it is returned as is: the caller decides whether that is an error.
    """
    head_size = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages)) + pinned
    head, body = messages[:head_size], messages[head_size:]
    while len(body) > 1 and count(head + body) > budget:
        body = body[1:]
        while len(body) > 1 and body[0]["role"] != "user":
            body = body[1:]
    return head + body


def fit(
    messages: list[Message],
    count: Callable[[list[Message]], int],
    budget: int,
    label: str | None,
    pinned: int = 0,
) -> list[Message]:
    """``messages`` trimmed to ``budget`` tokens, then labelled (the label counts against the budget)."""

    def labelled(candidate: list[Message]) -> int:
        return count(label_first_user(candidate, label))

    return label_first_user(trim_to_budget(messages, labelled, budget, pinned), label)


class ThinkSplitter:
    """Splits streamed ``<think>\\n…\\n</think>\\n…`` text into analysis and response deltas.

    The deltas add up to exactly what ``cot.split_inline`` gives for the whole text. Text that could
    still be the start of a tag, or whitespace that may turn out to end a part, is held back until
    the next chunk (or ``finish``) decides it.
    """

    def __init__(self) -> None:
        self.mode = "start"  # start -> analysis -> response, or start -> response
        self.buffer = ""
        self.started = False  # the current part has shown text (so leading whitespace is content)

    def feed(self, text: str) -> tuple[str, str]:
        """Add streamed ``text``; returns the (analysis, response) text that is now certain."""
        self.buffer += text
        analysis = ""
        if self.mode == "start":
            stripped = self.buffer.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.mode, self.buffer = "analysis", stripped[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(stripped):
                return "", ""
            else:
                self.mode = "response"
        if self.mode == "analysis":
            if THINK_CLOSE in self.buffer:
                body, self.buffer = self.buffer.split(THINK_CLOSE, 1)
                analysis = self._show(body).rstrip()
                self.mode, self.started = "response", False
            else:
                analysis = self._release(_partial_suffix(self.buffer, THINK_CLOSE))
                return analysis, ""
        return analysis, self._release(0)

    def finish(self) -> tuple[str, str]:
        """The held-back text once the stream has ended."""
        rest, self.buffer = self.buffer, ""
        text = self._show(rest).rstrip()
        return (text, "") if self.mode == "analysis" else ("", text)

    def _release(self, hold: int) -> str:
        """Give out the buffer but its last ``hold`` characters and any whitespace before them."""
        body = self.buffer[: len(self.buffer) - hold]
        keep = len(body) - len(body.rstrip()) + hold
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return self._show(out)

    def _show(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
