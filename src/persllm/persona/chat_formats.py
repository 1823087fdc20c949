"""Chat and transcript layouts read into ``Message``s (speaker, text, line, optional time), by file:

- ``NAME: line`` transcripts (plays, interviews, debates): ``.txt`` / ``.md`` / no suffix. A line that does
  not start with a speaker continues the turn before it; a line of only ``[...]`` or ``(...)`` is a stage
  direction and is left out; a ``#`` heading or a ``---`` rule starts a new conversation.
- JSONL with a speaker and a text on each line (``speaker``/``name``/``from``/``author`` and
  ``text``/``content``/``message``), an optional ``timestamp``/``time``/``date`` (ISO 8601 or Unix
  seconds) and an optional ``conversation`` that separates conversations.
- A WhatsApp text export (``[31/12/2020, 23:59:59] Name: text`` or ``31/12/20, 23:59 - Name: text``);
  day and month order is read from the file (a first field over 12 means day first, a second over 12
  month first; otherwise day first, as most locales write it).
- A Telegram JSON export (``result.json`` of one chat, or of all chats: ``chats.list``).
- A SillyTavern chat (``.jsonl`` whose rows carry ``mes``; its first line is the chat's metadata).

Every parser is a pure function of the file's path (for messages) and text; ``read_messages`` reads.
"""

import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from persllm.errors import UserError
from persllm.persona.corpus import decode, json_lines, normalise

LAYOUTS = ("transcript", "jsonl", "whatsapp", "telegram", "sillytavern")
SPEAKER_KEYS = ("speaker", "name", "from", "author")
TEXT_KEYS = ("text", "content", "message")
TIME_KEYS = ("timestamp", "time", "date")

_TRANSCRIPT_LINE = re.compile(r"^\s*([A-Za-z][\w .'’-]{0,39}?)\s*:\s+(\S.*)$")
_DIRECTION = re.compile(r"^\s*(\[[^\]]*\]|\([^)]*\))\s*$")
_BREAK = re.compile(r"^\s*(#|-{3,}|\*{3,}|={3,})")
_WHATSAPP_LINE = re.compile(
    r"^\u200e?\[?(\d{1,2})[/.](\d{1,2})[/.](\d{2,4}),?\s+(\d{1,2}):(\d{2})(?::(\d{2}))?\s*"
    r"([AaPp]\.?\s?[Mm]\.?)?\]?\s*(?:-\s+)?(.*)$"
)
_WHATSAPP_SKIP = {"<media omitted>", "image omitted", "video omitted", "audio omitted", "sticker omitted"}


@dataclass(frozen=True)
class Message:
    """One message of a conversation as read from a file."""

    speaker: str
    text: str
    line: int
    time: datetime | None = None
    conversation: int = 0


def continued(message: Message, line: str) -> Message:
    """``message`` with a continuation line appended to its text (a turn that runs over several lines)."""
    return replace(message, text=f"{message.text} {normalise(line)}")


# --------------------------------------------------------------------------- layouts


def detect_layout(path: Path, text: str) -> str:
    """Which of ``LAYOUTS`` a file is, by its suffix and its first lines; unknown is a user error."""
    suffix = path.suffix.lower()
    first = next((line for line in text.splitlines() if line.strip()), "")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc.msg}); fix the file") from None
        if isinstance(data, dict) and ("messages" in data or "chats" in data):
            return "telegram"
        raise UserError(
            f"{path}: a .json dialogue file must be a Telegram export (with 'messages' or 'chats'); "
            "write other chats as JSONL with speaker and text fields"
        )
    if suffix == ".jsonl":
        rows = [line for line in text.splitlines()[:3] if line.strip()]
        if any('"mes"' in line or '"character_name"' in line for line in rows):
            return "sillytavern"
        return "jsonl"
    head = [line for line in text.splitlines()[:20] if line.strip()]
    if _WHATSAPP_LINE.match(first) and any(_whatsapp_message(line) for line in head):
        return "whatsapp"
    if any(_TRANSCRIPT_LINE.match(line) for line in text.splitlines()):
        return "transcript"
    raise UserError(
        f"{path}: no dialogue layout recognised (expected 'NAME: line' transcripts, a WhatsApp or Telegram "
        "export, SillyTavern chat JSONL, or JSONL with speaker and text); convert it to one of these"
    )


def parse(path: Path, text: str, layout: str) -> list[Message]:
    """The messages of a file already read, in file order."""
    parsers = {
        "transcript": parse_transcript,
        "jsonl": parse_jsonl,
        "whatsapp": parse_whatsapp,
        "telegram": parse_telegram,
        "sillytavern": parse_sillytavern,
    }
    return parsers[layout](path, text)


def read_messages(path: Path) -> tuple[str, list[Message]]:
    """(layout, messages) of one dialogue file."""
    text = decode(path)
    layout = detect_layout(path, text)
    return layout, parse(path, text, layout)


def parse_transcript(path: Path, text: str) -> list[Message]:
    """``NAME: line`` turns; continuation lines join the turn above; headings and rules separate scenes."""
    messages: list[Message] = []
    conversation = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or _DIRECTION.match(line):
            continue
        if _BREAK.match(line):
            conversation += 1
            continue
        match = _TRANSCRIPT_LINE.match(line)
        if match:
            messages.append(
                Message(match.group(1).strip(), normalise(match.group(2)), number, None, conversation)
            )
        elif messages and messages[-1].conversation == conversation:
            messages[-1] = continued(messages[-1], line)
    return messages


def parse_jsonl(path: Path, text: str) -> list[Message]:
    """One message per JSON line: a speaker, a text, an optional time and conversation."""
    messages: list[Message] = []
    conversations: dict[str, int] = {}
    for number, row in json_lines(path, text):
        speaker = first_string(row, SPEAKER_KEYS) if isinstance(row, dict) else None
        said = first_string(row, TEXT_KEYS) if isinstance(row, dict) else None
        if speaker is None or said is None:
            raise UserError(
                f'{path}:{number}: a dialogue line needs a speaker and a text, e.g. {{"speaker": "Ada", '
                '"text": "..."}}; fix that line'
            )
        stamp = next((row[key] for key in TIME_KEYS if row.get(key) not in (None, "")), None)
        when = parse_time(stamp, f"{path}:{number}") if stamp is not None else None
        thread = conversations.setdefault(str(row.get("conversation", "")), len(conversations))
        if normalise(said):
            messages.append(Message(speaker.strip(), normalise(said), number, when, thread))
    return messages


def parse_whatsapp(path: Path, text: str) -> list[Message]:
    """A WhatsApp text export; system notices and omitted media are left out."""
    lines = text.splitlines()
    heads = [_WHATSAPP_LINE.match(line) for line in lines]
    day_first = day_order([(int(m.group(1)), int(m.group(2))) for m in heads if m])
    messages: list[Message] = []
    open_message = False
    for number, (line, match) in enumerate(zip(lines, heads, strict=True), start=1):
        found = _whatsapp_message(line) if match else None
        if match and found is None:
            open_message = False  # a system notice ("Messages are end-to-end encrypted", "X joined")
            continue
        if found is not None and match is not None:
            speaker, said = found
            open_message = normalise(said).lower() not in _WHATSAPP_SKIP
            if open_message:
                when = whatsapp_time(match, day_first, f"{path}:{number}")
                messages.append(Message(speaker, normalise(said), number, when))
        elif open_message and line.strip() and messages:
            messages[-1] = continued(messages[-1], line)
    return messages


def _whatsapp_message(line: str) -> tuple[str, str] | None:
    match = _WHATSAPP_LINE.match(line)
    if not match:
        return None
    rest = match.group(8).lstrip("\u200e ")
    speaker, colon, said = rest.partition(": ")
    if not colon or not speaker.strip() or len(speaker) > 60:
        return None
    return speaker.strip().lstrip("\u200e~ ").strip(), said


def day_order(pairs: list[tuple[int, int]]) -> bool:
    """True when a file's dates are day first: a first field over 12, or nothing says month first."""
    if any(first > 12 for first, _ in pairs):
        return True
    return not any(second > 12 for _, second in pairs)


def whatsapp_time(match: re.Match[str], day_first: bool, where: str) -> datetime:
    first, second, year = int(match.group(1)), int(match.group(2)), int(match.group(3))
    day, month = (first, second) if day_first else (second, first)
    hour, minute, secs = int(match.group(4)), int(match.group(5)), int(match.group(6) or 0)
    meridiem = (match.group(7) or "").lower().replace(".", "").replace(" ", "")
    if meridiem == "pm" and hour < 12:
        hour += 12
    elif meridiem == "am" and hour == 12:
        hour = 0
    try:
        return datetime(year + 2000 if year < 100 else year, month, day, hour, minute, secs)
    except ValueError:
        raise UserError(f"{where}: not a valid date and time; fix the line or the export") from None


def parse_telegram(path: Path, text: str) -> list[Message]:
    """A Telegram Desktop JSON export: one chat's ``messages``, or every chat of ``chats.list``."""
    data = json.loads(text)
    chats = data.get("chats", {}).get("list", []) if "chats" in data else [data]
    messages: list[Message] = []
    for conversation, chat in enumerate(chats):
        for index, row in enumerate(chat.get("messages") or []):
            if not isinstance(row, dict) or row.get("type", "message") != "message":
                continue
            said = telegram_text(row.get("text"))
            speaker = row.get("from")
            if not isinstance(speaker, str) or not said:
                continue
            stamp = row.get("date_unixtime") or row.get("date")
            when = parse_time(stamp, f"{path}: messages[{index}]") if stamp else None
            messages.append(Message(speaker.strip(), said, index + 1, when, conversation))
    return messages


def telegram_text(value: Any) -> str:
    """A Telegram message's text: a string, or a list of strings and ``{"text": ...}`` entities."""
    if isinstance(value, str):
        return normalise(value)
    if isinstance(value, list):
        parts = [part if isinstance(part, str) else str(part.get("text", "")) for part in value]
        return normalise("".join(parts))
    return ""


def parse_sillytavern(path: Path, text: str) -> list[Message]:
    """A SillyTavern chat: the metadata line is skipped, system messages too."""
    messages: list[Message] = []
    for number, row in json_lines(path, text):
        if not isinstance(row, dict) or "mes" not in row or row.get("is_system"):
            continue
        speaker, said = row.get("name"), row.get("mes")
        if not isinstance(speaker, str) or not isinstance(said, str):
            raise UserError(f"{path}:{number}: a SillyTavern message needs string 'name' and 'mes'; fix it")
        stamp = row.get("send_date")
        when = parse_time(stamp, f"{path}:{number}", strict=False) if stamp else None
        if normalise(said):
            messages.append(Message(speaker.strip(), normalise(said), number, when))
    return messages


def first_string(row: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((row[key] for key in keys if isinstance(row.get(key), str)), None)


def parse_time(value: Any, where: str, strict: bool = True) -> datetime | None:
    """ISO 8601 text, Unix seconds (or milliseconds), or SillyTavern's 'December 6, 2026 7:45am'."""
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        seconds = float(value)
        seconds = seconds / 1000 if seconds > 1e11 else seconds
        return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return parsed.astimezone(UTC).replace(tzinfo=None) if parsed.tzinfo else parsed
        except ValueError:
            pass
        for layout in ("%B %d, %Y %I:%M%p", "%B %d, %Y %I:%M %p", "%Y-%m-%d %H:%M:%S"):
            try:
                return datetime.strptime(text, layout)
            except ValueError:
                continue
    if not strict:
        return None
    raise UserError(f"{where}: time {value!r} is not ISO 8601 or Unix seconds; fix it or leave it out")
