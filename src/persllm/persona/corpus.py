"""Reading a persona's corpus into chunks: paragraphs with their source ``file:line`` kept.

``.jsonl`` files give one paragraph per object (its ``text`` field); every other file is read as
plain text (``.txt``, ``.md``, no suffix, ...): paragraphs are separated by blank lines, or are one per
line when the file has no blank line at all. Whitespace is normalised, empty and repeated paragraphs
are dropped, and paragraphs over ``corpus.max_words`` words are split at sentence boundaries, each
piece keeping the line it starts on.
"""

import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from persllm.config.project import CorpusConfig, Workspace
from persllm.errors import UserError
from persllm.hashing import stable_hash

KINDS = ("knowledge", "style")

# A sentence ends at . ! ? (plus closing quotes/brackets) followed by space; the next sentence must not
# start in lower case, so "e.g. this" and "Mr. smith" style breaks are rarer.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[^\sa-z])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "gen", "col", "capt", "rev", "hon", "vs", "jr", "sr"}


@dataclass(frozen=True)
class Chunk:
    """One retrievable paragraph (or piece of one) of a persona's stage material."""

    id: str
    persona: str
    stage: str
    kind: str
    text: str
    ref: str
    words: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Chunk":
        return cls(**{key: row[key] for key in ("id", "persona", "stage", "kind", "text", "ref", "words")})


def chunk_id(persona: str, stage: str, kind: str, text: str) -> str:
    return stable_hash({"persona": persona, "stage": stage, "kind": kind, "text": text})


def normalise(text: str) -> str:
    """NFC, every run of whitespace (newlines included) turned into one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


# --------------------------------------------------------------------------- pure splitting


def paragraph_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The raw lines of each paragraph with the 1-based line number it starts on."""
    lines = text.splitlines()
    if not any(not line.strip() for line in lines):
        return [(number, [line]) for number, line in enumerate(lines, start=1)]
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 0
    for number, line in enumerate(lines, start=1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            blocks.append((start, current))
            current = []
    if current:
        blocks.append((start, current))
    return blocks


def split_paragraphs(text: str) -> list[tuple[int, str]]:
    """``(line, paragraph)`` pairs of a plain text: blank-line separated, or one per line if none.

    Paragraph text is whitespace-normalised; empty paragraphs are left out.
    """
    pairs = [(line, normalise(" ".join(block))) for line, block in paragraph_blocks(text)]
    return [(line, paragraph) for line, paragraph in pairs if paragraph]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a normalised paragraph; common abbreviations (Mr., Dr., ...) do not end one."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        before = paragraph[start : match.start()].rsplit(" ", 1)[-1].lower()
        if match.group().startswith(".") and before in _ABBREVIATIONS:
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_long(paragraph: str, max_words: int) -> list[str]:
    """Pieces of at most ``max_words`` words, cut at sentence boundaries.

    Whole sentences are packed greedily; a single sentence longer than ``max_words`` is cut between
    words. Joining the pieces' words gives back the paragraph's words exactly.
    """
    words = paragraph.split()
    if len(words) <= max_words:
        return [" ".join(words)] if words else []
    pieces: list[list[str]] = []
    current: list[str] = []
    for sentence in split_sentences(" ".join(words)):
        sentence_words = sentence.split()
        while len(sentence_words) > max_words:
            if current:
                pieces.append(current)
                current = []
            pieces.append(sentence_words[:max_words])
            sentence_words = sentence_words[max_words:]
        if current and len(current) + len(sentence_words) > max_words:
            pieces.append(current)
            current = []
        current = current + sentence_words
    if current:
        pieces.append(current)
    return [" ".join(piece) for piece in pieces]


def reply_cut(passage: str, max_words: int) -> str:
    """The passage as a reply: its first sentences, whole, up to ``max_words`` words.

    The first sentence is always kept; when it alone is longer than ``max_words`` it is cut between words
    (so a reply is never empty and never much longer than asked).
    """
    sentences = split_sentences(normalise(passage))
    kept: list[str] = []
    count = 0
    for sentence in sentences:
        n = len(sentence.split())
        if kept and count + n > max_words:
            break
        kept.append(sentence)
        count += n
    text = " ".join(kept)
    return text if count <= max_words else " ".join(text.split()[:max_words])


def split_block(start: int, lines: list[str], max_words: int) -> list[tuple[int, str]]:
    """Split one paragraph's raw lines into ``(line, piece)`` pairs, each piece on the line it starts."""
    word_lines = [start + offset for offset, line in enumerate(lines) for _ in normalise(line).split()]
    paragraph = normalise(" ".join(lines))
    result: list[tuple[int, str]] = []
    position = 0
    for piece in split_long(paragraph, max_words):
        result.append((word_lines[position] if position < len(word_lines) else start, piece))
        position += len(piece.split())
    return result


# --------------------------------------------------------------------------- files


def decode(path: Path) -> str:
    """A corpus file's text; binary or non-UTF-8 content is a user error naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); check the file and its permissions") from None
    if b"\x00" in data:
        raise UserError(f"{path}: looks like a binary file (NUL bytes); corpus files must be UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8"
        ) from None


def json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL text; bad JSON names the line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); fix that line") from None


def jsonl_blocks(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """One block per JSON line: its ``text`` field, which must be a string."""
    blocks: list[tuple[int, list[str]]] = []
    for number, row in json_lines(path, text):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'{path}:{number}: needs a string "text" field; add one, e.g. {{"text": "..."}}')
        blocks.append((number, [row["text"]]))
    return blocks


def file_pieces(path: Path, max_words: int) -> list[tuple[int, str]]:
    """``(line, text)`` of every chunk-sized piece of one corpus file, in file order."""
    text = decode(path)
    blocks = jsonl_blocks(path, text) if path.suffix.lower() == ".jsonl" else paragraph_blocks(text)
    return [piece for line, block in blocks for piece in split_block(line, block, max_words) if piece[1]]


def ref_path(path: Path, root: Path) -> str:
    """``path`` relative to the project root, with forward slashes (``..`` when outside it)."""
    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def read_stage_chunks(
    workspace: Workspace, corpus: CorpusConfig, persona_id: str, stage_id: str
) -> list[Chunk]:
    """All chunks of one stage: its knowledge files, then its style files, in file order.

    Repeats of the same text within a stage and kind are dropped (the first occurrence is kept). A stage
    with no text at all is a user error, unless it has dialogue material (``persona.dialogue``).
    """
    chunks: list[Chunk] = []
    files: list[Path] = []
    for kind in KINDS:
        seen: set[str] = set()
        for path in workspace.stage_files(persona_id, stage_id, kind):
            check_size(workspace, corpus, path)
            files.append(path)
            source = ref_path(path, workspace.root)
            for line, text in file_pieces(path, corpus.max_words):
                if text in seen:
                    continue
                seen.add(text)
                chunks.append(
                    Chunk(
                        id=chunk_id(persona_id, stage_id, kind, text),
                        persona=persona_id,
                        stage=stage_id,
                        kind=kind,
                        text=text,
                        ref=f"{source}:{line}",
                        words=len(text.split()),
                    )
                )
    persona = workspace.persona(persona_id)
    has_dialogue = bool(persona.stage(stage_id).dialogue or persona.dialogue)
    if not chunks and not has_dialogue:
        names = ", ".join(ref_path(path, workspace.root) for path in files)
        where = workspace.persona_paths.get(persona_id, workspace.config_path)
        raise UserError(
            f"{where}: stage {stage_id!r}: its files hold no text ({names}); add the person's material or "
            "remove the stage"
        )
    return chunks


def check_size(workspace: Workspace, corpus: CorpusConfig, path: Path) -> None:
    """A corpus file over ``corpus.max_file_mb`` is refused before it is read into memory."""
    limit = corpus.max_file_mb
    size = path.stat().st_size
    if size > limit * 2**20:
        raise UserError(
            f"{path}: {size / 2**20:.1f} MB is over corpus.max_file_mb ({limit} MB); split it into "
            f"smaller files, or raise corpus.max_file_mb in {workspace.config_path.name}"
        )
