"""Character Cards (the role-play cards SillyTavern and others share): V2 and V3 in, V3 out.

A card is JSON (``{"spec": "chara_card_v3", "spec_version": "3.0", "data": {...}}``) or a PNG that
carries it base64-encoded in a text chunk (``ccv3`` for V3, ``chara`` for V2; both are read, V3 first).

In: ``card_project`` turns a card into a persona file and a corpus. Description, personality, scenario
and the lorebook's entries are knowledge; the greetings are the character's own words (style); the
example messages (``<START>`` blocks of ``{{user}}:`` / ``{{char}}:`` lines) are dialogue.

Out: ``persona_card`` writes a V3 card of a persona at one stage: the persona's prompt, its stages in
``extensions.persllm`` (which the import reads back, so a card round-trips), example messages from its real
exchanges, and a lorebook of the index's knowledge passages.
"""

import base64
import binascii
import json
import re
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from persllm.errors import UserError
from persllm.terms import salient_terms

SPECS = {"chara_card_v2": "2.0", "chara_card_v3": "3.0"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
V3_REQUIRED = (
    "name",
    "description",
    "tags",
    "creator",
    "character_version",
    "mes_example",
    "extensions",
    "system_prompt",
    "post_history_instructions",
    "first_mes",
    "alternate_greetings",
    "personality",
    "scenario",
    "creator_notes",
    "group_only_greetings",
)
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
ENTRY_REQUIRED = ("keys", "content", "extensions", "enabled", "insertion_order", "use_regex")
USER = "User"


# --------------------------------------------------------------------------- reading


def read_card(path: Path) -> dict[str, Any]:
    """The card in ``path`` (JSON or PNG) as ``{"spec", "spec_version", "data"}``; V1 cards are lifted."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); check the path") from None
    text = png_card_text(path, raw) if raw.startswith(PNG_SIGNATURE) else raw.decode("utf-8-sig", "replace")
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not a character card (invalid JSON: {exc.msg}); export it again") from None
    return normalise_card(card, path)


def normalise_card(card: Any, path: Path) -> dict[str, Any]:
    if not isinstance(card, dict):
        raise UserError(f"{path}: not a character card (expected a JSON object); export it again")
    spec = card.get("spec")
    if spec is None and isinstance(card.get("name"), str):  # V1: the fields at the top level
        return {"spec": "chara_card_v1", "spec_version": "1.0", "data": card}
    if spec not in SPECS:
        raise UserError(
            f"{path}: unknown card spec {spec!r} (version {card.get('spec_version')!r}); persllm reads "
            "chara_card_v2 and chara_card_v3; re-export the card as V2 or V3"
        )
    data = card.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"].strip():
        raise UserError(f"{path}: {spec} card without data.name; fix or re-export the card")
    return {"spec": spec, "spec_version": str(card.get("spec_version", SPECS[spec])), "data": data}


def png_chunks(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG file."""
    chunks: list[tuple[bytes, bytes]] = []
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(raw):
        (length,) = struct.unpack(">I", raw[position : position + 4])
        kind = raw[position + 4 : position + 8]
        chunks.append((kind, raw[position + 8 : position + 8 + length]))
        position += 12 + length
        if kind == b"IEND":
            break
    return chunks


def png_text(kind: bytes, data: bytes) -> tuple[str, str] | None:
    """(keyword, text) of a tEXt, zTXt or iTXt chunk; None for other chunks."""
    keyword, _, rest = data.partition(b"\x00")
    if kind == b"tEXt":
        return keyword.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":
        return keyword.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
    if kind == b"iTXt":
        compressed, rest = rest[0], rest[2:]
        _language, _, rest = rest.partition(b"\x00")
        _translated, _, body = rest.partition(b"\x00")
        return keyword.decode("latin-1"), (zlib.decompress(body) if compressed else body).decode("utf-8")
    return None


def png_card_text(path: Path, raw: bytes) -> str:
    """The card JSON inside a PNG: its ``ccv3`` text chunk, else its ``chara`` one (base64)."""
    texts = dict(found for kind, data in png_chunks(raw) if (found := png_text(kind, data)))
    encoded = texts.get("ccv3") or texts.get("chara")
    if encoded is None:
        raise UserError(
            f"{path}: this PNG holds no character card (no 'ccv3' or 'chara' text chunk); export the card "
            "again from its app, as PNG or JSON"
        )
    try:
        return base64.b64decode(encoded).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise UserError(
            f"{path}: the card chunk of this PNG is not base64 JSON; re-export the card"
        ) from None


# --------------------------------------------------------------------------- card -> project


def fill_macros(text: str, name: str) -> str:
    """``{{char}}`` / ``<BOT>`` become the character's name, ``{{user}}`` / ``<USER>`` the user's."""
    text = re.sub(r"\{\{char\}\}|<bot>", name, text, flags=re.IGNORECASE)
    return re.sub(r"\{\{user\}\}|<user>", USER, text, flags=re.IGNORECASE)


def example_transcript(mes_example: str, name: str) -> str:
    """The card's example messages as a ``NAME: line`` transcript, ``<START>`` blocks split by ``---``."""
    blocks = [block.strip() for block in re.split(r"<START>", mes_example, flags=re.IGNORECASE)]
    lines: list[str] = []
    for block in (b for b in blocks if b):
        if lines:
            lines.append("---")
        for raw in fill_macros(block, name).splitlines():
            if raw.strip():
                lines.append(raw.strip())
    return "\n".join(lines) + ("\n" if lines else "")


def slug(name: str) -> str:
    words = re.findall(r"[a-z0-9]+", name.lower())
    return "-".join(words)[:40] or "persona"


def card_project(card: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the persona file's data, corpus files by path relative to the project) of a card.

    A card persllm wrote carries its stages in ``extensions.persllm``: they come back as they were, the
    lorebook's entries each to its stage. Any other card is one stage, ``card``.
    """
    data = card["data"]
    name = data["name"].strip()
    ours = (data.get("extensions") or {}).get("persllm") or {}
    persona_id = str(ours.get("id") or slug(name))
    stages = ours.get("stages") or [
        {
            "id": "card",
            "time": first_sentence(data.get("scenario", ""))
            or "The present day, as the character's scenario describes it.",
        }
    ]
    chosen = ours.get("stage") or stages[-1]["id"]
    files: dict[str, str] = {}
    knowledge: dict[str, list[str]] = {stage["id"]: [] for stage in stages}
    if not ours:
        knowledge[chosen] += [
            fill_macros(str(data.get(key) or ""), name) for key in ("description", "personality", "scenario")
        ]
    book = data.get("character_book") or {}
    for lore in book.get("entries") or []:
        if not isinstance(lore, dict) or not str(lore.get("content") or "").strip():
            continue
        marked = ((lore.get("extensions") or {}).get("persllm") or {}).get("stage")
        knowledge[marked if marked in knowledge else chosen].append(fill_macros(str(lore["content"]), name))
    greetings = [data.get("first_mes") or "", *(data.get("alternate_greetings") or [])]
    greetings = [fill_macros(str(g), name) for g in greetings if str(g).strip()]
    dialogue = example_transcript(str(data.get("mes_example") or ""), name)
    persona_stages = []
    for stage in stages:
        folder = f"corpus/{persona_id}/{stage['id']}"
        entry: dict[str, Any] = {"id": stage["id"], "time": stage["time"]}
        if stage.get("label"):
            entry["label"] = stage["label"]
        texts = [t.strip() for t in knowledge[stage["id"]] if t.strip()]
        if texts:
            files[f"{folder}/knowledge.md"] = "\n\n".join(texts) + "\n"
            entry["knowledge"] = [f"../{folder}/*.md"]
        if stage["id"] == chosen and greetings:
            files[f"{folder}/greetings.txt"] = "\n\n".join(greetings) + "\n"
            entry["style"] = [f"../{folder}/*.txt"]
        if stage["id"] == chosen and dialogue:
            files[f"{folder}/dialogue/examples.txt"] = dialogue
            entry["dialogue"] = [f"../{folder}/dialogue/*.txt"]
        persona_stages.append(entry)
    persona = {
        "id": persona_id,
        "name": name,
        "profile": ours.get("profile") or fill_macros(str(data.get("personality") or ""), name).strip(),
        "language": ours.get("language") or "en",
        "speakers": ours.get("speakers") or [name],
        "stages": persona_stages,
    }
    return persona, files


def first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text)[:200]


# --------------------------------------------------------------------------- persona -> card


def keywords(text: str, count: int = 4) -> list[str]:
    """The most frequent content words of a passage (ties: first seen): a lorebook entry's keys."""

    return [word for word, _ in Counter(salient_terms(text)).most_common(count)]


def persona_card(
    persona: dict[str, Any],
    stage_id: str,
    system_prompt: str,
    knowledge: list[tuple[str, str, str]],
    exchanges: list[list[dict[str, str]]],
    greeting: str,
    version: str,
) -> dict[str, Any]:
    """A V3 card of ``persona`` (its persona-file data) at ``stage_id``.

    Args:
        knowledge: (stage id, ref, text) of the index's knowledge passages: the lorebook.
        exchanges: a few real exchanges of the stage (turn lists): the example messages.
        greeting: the card's first message (a passage of the person's own words, or '').
    """
    stages = [
        {key: stage[key] for key in ("id", "time", "label") if stage.get(key)} for stage in persona["stages"]
    ]
    stage = next(s for s in stages if s["id"] == stage_id)
    examples = [
        "<START>\n"
        + "\n".join(
            f"{'{{char}}' if t['role'] == 'assistant' else '{{user}}'}: {t['content']}" for t in turns
        )
        for turns in exchanges
    ]
    entries = [
        {
            "keys": keywords(text),
            "content": text,
            "extensions": {"persllm": {"stage": stage_of, "ref": ref}},
            "enabled": True,
            "insertion_order": number,
            "use_regex": False,
            "constant": False,
            "case_sensitive": False,
            "id": number,
            "name": ref,
            "comment": f"{stage_of}: {ref}",
        }
        for number, (stage_of, ref, text) in enumerate(knowledge)
    ]
    data = {
        "name": persona["name"],
        "description": persona.get("profile", ""),
        "personality": persona.get("profile", ""),
        "scenario": stage["time"],
        "first_mes": greeting,
        "mes_example": "\n".join(examples),
        "creator_notes": f"Made by persllm {version} from persona {persona['id']!r} at stage {stage_id!r}.",
        "system_prompt": system_prompt,
        "post_history_instructions": "",
        "alternate_greetings": [],
        "group_only_greetings": [],
        "tags": ["persllm", persona["id"], stage_id],
        "creator": "persllm",
        "character_version": version,
        "extensions": {
            "persllm": {
                "id": persona["id"],
                "profile": persona.get("profile", ""),
                "language": persona.get("language", "en"),
                "speakers": persona.get("speakers") or [persona["name"]],
                "stages": stages,
                "stage": stage_id,
            }
        },
        "character_book": {
            "name": f"{persona['name']}: what persllm's index knows",
            "description": "Knowledge passages of every stage, one entry each (extensions.persllm.stage).",
            "scan_depth": 4,
            "token_budget": 1024,
            "recursive_scanning": False,
            "extensions": {},
            "entries": entries,
        },
    }
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data, **v1_fields(data)}


def v1_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The V1 fields mirrored at the top level, as SillyTavern writes them, for readers of V1 cards."""
    return {key: data.get(key, "") for key in V1_FIELDS}


def card_problems(card: dict[str, Any]) -> list[str]:
    """What a V3 card lacks against the spec's required fields (empty: valid)."""
    problems = []
    if card.get("spec") != "chara_card_v3" or card.get("spec_version") != "3.0":
        problems.append("spec must be chara_card_v3 and spec_version 3.0")
    data = card.get("data") or {}
    problems += [f"data.{key} missing" for key in V3_REQUIRED if key not in data]
    lists = ("tags", "alternate_greetings", "group_only_greetings")
    problems += [
        f"data.{key} must be a list of strings"
        for key in lists
        if not isinstance(data.get(key), list) or not all(isinstance(x, str) for x in data[key])
    ]
    book = data.get("character_book")
    if book is not None:
        if not isinstance(book.get("extensions"), dict) or not isinstance(book.get("entries"), list):
            problems.append("data.character_book needs extensions and entries")
        for number, entry in enumerate(book.get("entries") or []):
            problems += [
                f"character_book.entries[{number}].{key} missing"
                for key in ENTRY_REQUIRED
                if key not in entry
            ]
    return problems


def png_with_card(card: dict[str, Any]) -> bytes:
    """A 1x1 PNG carrying the card: ``ccv3`` (V3) and ``chara`` (the same data as V2, for older apps)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    v2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": card["data"], **v1_fields(card["data"])}
    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00\x00\x00\x00")
    return b"".join(
        [
            PNG_SIGNATURE,
            chunk(b"IHDR", header),
            chunk(b"tEXt", b"chara\x00" + base64_json(v2)),
            chunk(b"tEXt", b"ccv3\x00" + base64_json(card)),
            chunk(b"IDAT", pixels),
            chunk(b"IEND", b""),
        ]
    )


def base64_json(value: Any) -> bytes:
    return base64.b64encode(json.dumps(value, ensure_ascii=False).encode("utf-8"))
