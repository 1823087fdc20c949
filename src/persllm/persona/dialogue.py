"""Dialogue material: a person's real exchanges, from transcripts and chat exports (``chat_formats``).

A conversation becomes ``Exchange``s: consecutive messages of one side are one turn, and every persona
turn after someone else's is the reply to up to ``context_turns`` earlier exchanges. Timestamped chats
break into conversations at gaps longer than ``gap_hours``. ``read_persona_exchanges`` reads a persona's
files and assigns dated chats to stages; everything else here is pure.
"""

from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persllm.errors import UserError
from persllm.persona.chat_formats import Message, read_messages
from persllm.persona.corpus import check_size, ref_path

if TYPE_CHECKING:
    from persllm.config.project import CorpusConfig, Workspace


@dataclass
class Exchange:
    """A persona reply with the real turns before it: user, assistant, ..., user, assistant (the reply)."""

    turns: list[dict[str, str]]
    ref: str
    time: str | None = None
    conversation: int = 0
    blocks: tuple[int, int] = (0, 0)  # first and last turn index within the conversation
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["blocks"] = list(self.blocks)
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Exchange":
        blocks = row.get("blocks") or (0, 0)
        return cls(
            turns=row["turns"],
            ref=row["ref"],
            time=row.get("time"),
            conversation=int(row.get("conversation", 0)),
            blocks=(int(blocks[0]), int(blocks[1])),
            meta=row.get("meta") or {},
        )

    @property
    def reply(self) -> str:
        return self.turns[-1]["content"]


# --------------------------------------------------------------------------- exchanges


def is_persona(speaker: str, speakers: list[str]) -> bool:
    return speaker.casefold() in {name.casefold() for name in speakers}


def conversations(messages: list[Message], gap_hours: float) -> list[list[Message]]:
    """Messages split into conversations: at a change of ``conversation`` or a gap over ``gap_hours``."""
    groups: list[list[Message]] = []
    for message in messages:
        previous = groups[-1][-1] if groups and groups[-1] else None
        new = previous is None or previous.conversation != message.conversation
        if not new and previous is not None and previous.time and message.time:
            new = (message.time - previous.time).total_seconds() > gap_hours * 3600
        if new:
            groups.append([])
        groups[-1].append(message)
    return groups


def turn_blocks(conversation: list[Message], speakers: list[str]) -> list[tuple[str, list[Message]]]:
    """Consecutive messages of one side merged: (``assistant`` for the persona or ``user``, messages)."""
    blocks: list[tuple[str, list[Message]]] = []
    for message in conversation:
        role = "assistant" if is_persona(message.speaker, speakers) else "user"
        if blocks and blocks[-1][0] == role:
            blocks[-1][1].append(message)
        else:
            blocks.append((role, [message]))
    return blocks


def block_text(role: str, messages: list[Message], named: bool) -> str:
    """A turn's text; with several other speakers in the conversation, each line says who spoke."""
    if role == "user" and named:
        return "\n".join(f"{m.speaker}: {m.text}" for m in messages)
    return "\n".join(m.text for m in messages)


def exchanges_of(
    messages: list[Message], speakers: list[str], source: str, context_turns: int, gap_hours: float
) -> list[Exchange]:
    """Every persona turn that follows someone else's, with up to ``context_turns`` exchanges before it."""
    found: list[Exchange] = []
    for number, conversation in enumerate(conversations(messages, gap_hours)):
        blocks = turn_blocks(conversation, speakers)
        others = {m.speaker.casefold() for role, ms in blocks if role == "user" for m in ms}
        texts = [block_text(role, ms, len(others) > 1) for role, ms in blocks]
        for index, (role, block) in enumerate(blocks):
            if role != "assistant" or index == 0:
                continue
            start = max(blocks[0][0] != "user", index - 2 * context_turns + 1)
            start += (index - start) % 2 == 0  # the window opens on a user turn
            turns = [{"role": blocks[i][0], "content": texts[i]} for i in range(start, index + 1)]
            when = block[0].time
            found.append(
                Exchange(
                    turns=turns,
                    ref=f"{source}:{block[0].line}",
                    time=when.isoformat() if when else None,
                    conversation=number,
                    blocks=(start, index),
                )
            )
    return found


def without_heldout(train: list[Exchange], heldout: list[Exchange]) -> list[Exchange]:
    """Training exchanges whose context would show a held-out reply start after it (or are dropped)."""
    held = {(e.ref.rsplit(":", 1)[0], e.conversation, e.blocks[1]) for e in heldout}
    kept: list[Exchange] = []
    for exchange in train:
        source = exchange.ref.rsplit(":", 1)[0]
        start, end = exchange.blocks
        cut = max(
            (h for s, c, h in held if s == source and c == exchange.conversation and start <= h < end),
            default=None,
        )
        if cut is None:
            kept.append(exchange)
            continue
        drop = cut + 1 - start
        if drop < len(exchange.turns) - 1:
            kept.append(
                Exchange(
                    exchange.turns[drop:],
                    exchange.ref,
                    exchange.time,
                    exchange.conversation,
                    (cut + 1, end),
                    exchange.meta,
                )
            )
    return kept


def in_range(when: date, since: date | None, until: date | None) -> bool:
    return (since is None or when >= since) and (until is None or when <= until)


# --------------------------------------------------------------------------- a persona's files


def read_persona_exchanges(
    workspace: "Workspace", corpus: "CorpusConfig", persona_id: str
) -> dict[str, list[Exchange]]:
    """Stage id -> the exchanges of the persona's dialogue material, in file order.

    A stage's own ``dialogue`` files are all its; the persona's dated ``dialogue`` files are spread by the
    time of each reply over the stages' ``since`` / ``until``. A file where the persona never speaks, or a
    dated reply outside every stage, is a user error naming the file (and line).
    """
    persona = workspace.persona(persona_id)
    speakers = persona.speaker_names
    found: dict[str, list[Exchange]] = {stage.id: [] for stage in persona.stages}

    def exchanges(path: Path) -> list[Exchange]:
        check_size(workspace, corpus, path)
        layout, messages = read_messages(path)
        if not any(is_persona(m.speaker, speakers) for m in messages):
            heard = sorted({m.speaker for m in messages})[:5]
            raise UserError(
                f"{path}: {persona.name} never speaks here (speakers found: {', '.join(heard) or 'none'}); "
                f"add their name as written to `speakers` in {workspace.persona_paths[persona_id].name}"
            )
        source = ref_path(path, workspace.root)
        rows = exchanges_of(
            messages, speakers, source, corpus.dialogue_context_turns, corpus.dialogue_gap_hours
        )
        for row in rows:
            row.meta["layout"] = layout
        return rows

    for stage in persona.stages:
        for path in workspace.stage_files(persona_id, stage.id, "dialogue"):
            found[stage.id] += exchanges(path)
    for path in workspace.dated_dialogue_files(persona_id):
        for exchange in exchanges(path):
            if exchange.time is None:
                raise UserError(
                    f"{exchange.ref}: this reply has no time, so no stage can be chosen by date; move "
                    "the file under a stage's `dialogue`, or export the chat with times"
                )
            day = datetime.fromisoformat(exchange.time).date()
            dated = next((s for s in persona.stages if in_range(day, s.since, s.until)), None)
            if dated is None:
                raise UserError(
                    f"{exchange.ref}: dated {day} is outside every stage of {persona_id!r}; widen a "
                    "stage's `since` / `until`, or add a stage for it"
                )
            found[dated.id].append(exchange)
    return found
