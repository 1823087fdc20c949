"""Corpus reading: paragraphs, every input format, refs, dedup, long-paragraph splitting, bad files."""

from pathlib import Path

import pytest

from persllm.config import load_project
from persllm.errors import UserError
from persllm.persona import Chunk, read_stage_chunks, split_long, split_paragraphs
from persllm.persona.corpus import chunk_id, split_sentences


def make_project(
    root: Path, files: dict[str, str | bytes], knowledge: list[str], style: list[str], max_words: int = 200
) -> Path:
    """A one-persona, one-stage project whose corpus is ``files`` (paths relative to ``root``)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    (root / "personas").mkdir(exist_ok=True)
    (root / "personas" / "ada.yaml").write_text(
        "id: ada\nname: Ada\nstages:\n"
        f"  - id: young\n    time: It is 1830.\n    knowledge: {knowledge}\n    style: {style}\n",
        encoding="utf-8",
    )
    config = root / "persllm.yaml"
    config.write_text(
        f"project: t\npersonas: [personas/ada.yaml]\ncorpus:\n  max_words: {max_words}\n", encoding="utf-8"
    )
    return config


def chunks_of(config: Path) -> list[Chunk]:
    return read_stage_chunks(
        load_project(config).workspace, load_project(config).config.corpus, "ada", "young"
    )


# --------------------------------------------------------------------------- pure functions


def test_split_paragraphs_blank_line_separated_keeps_first_line_and_normalises() -> None:
    text = "First  para\nstill first.\n\n\n  Second\tpara.  \n   \nThird."
    assert split_paragraphs(text) == [(1, "First para still first."), (5, "Second para."), (7, "Third.")]


def test_split_paragraphs_one_per_line_when_no_blank_lines() -> None:
    assert split_paragraphs("alpha\nbeta  gamma\ndelta") == [(1, "alpha"), (2, "beta gamma"), (3, "delta")]


def test_split_paragraphs_whitespace_only_lines_count_as_blank() -> None:
    assert split_paragraphs("a\nb\n \t \nc\n") == [(1, "a b"), (4, "c")]


def test_split_sentences_keeps_abbreviations_together() -> None:
    text = 'Mr. Brack came at nine. "Is it late?" he asked! Dr. Tate said no. The end'
    assert split_sentences(text) == [
        "Mr. Brack came at nine.",
        '"Is it late?" he asked!',
        "Dr. Tate said no.",
        "The end",
    ]


def test_split_long_packs_sentences_within_budget_and_keeps_every_word() -> None:
    paragraph = "One two three. Four five six seven. Eight nine. " + " ".join(f"W{i}" for i in range(9)) + "."
    pieces = split_long(paragraph, 4)
    assert pieces[:3] == ["One two three.", "Four five six seven.", "Eight nine."]
    assert all(len(piece.split()) <= 4 for piece in pieces)
    assert " ".join(pieces).split() == paragraph.split()
    assert split_long("short one.", 4) == ["short one."]
    assert split_long("", 4) == []


# --------------------------------------------------------------------------- formats and refs


def test_txt_paragraphs_md_and_refs(tmp_path: Path) -> None:
    config = make_project(
        tmp_path,
        {
            "corpus/bio.md": "# Early life\n\nAda was born\nin London.\n\nShe studied mathematics.\n",
            "corpus/letters.txt": "Dear Sir, I write in haste.\nYours, Ada.\n\n\nA second letter.\n",
        },
        knowledge=["../corpus/*.md"],
        style=["../corpus/*.txt"],
    )
    chunks = chunks_of(config)
    assert [(c.kind, c.text, c.ref) for c in chunks] == [
        ("knowledge", "# Early life", "corpus/bio.md:1"),
        ("knowledge", "Ada was born in London.", "corpus/bio.md:3"),
        ("knowledge", "She studied mathematics.", "corpus/bio.md:6"),
        ("style", "Dear Sir, I write in haste. Yours, Ada.", "corpus/letters.txt:1"),
        ("style", "A second letter.", "corpus/letters.txt:5"),
    ]
    first = chunks[1]
    assert first.persona == "ada" and first.stage == "young" and first.words == 5
    assert first.id == chunk_id("ada", "young", "knowledge", "Ada was born in London.")
    assert Chunk.from_dict(first.to_dict()) == first


def test_txt_one_paragraph_per_line(tmp_path: Path) -> None:
    config = make_project(
        tmp_path,
        {"corpus/lines.txt": "Line one.\nLine two.\nLine three."},
        knowledge=[],
        style=["../corpus/*"],
    )
    assert [(c.text, c.ref) for c in chunks_of(config)] == [
        ("Line one.", "corpus/lines.txt:1"),
        ("Line two.", "corpus/lines.txt:2"),
        ("Line three.", "corpus/lines.txt:3"),
    ]


def test_jsonl_text_field_with_line_refs(tmp_path: Path) -> None:
    config = make_project(
        tmp_path,
        {
            "corpus/q.jsonl": '{"text": "First  quote.", "year": 1840}\n\n'
            '{"text": "Second\\nquote."}\n{"text": ""}\n'
        },
        knowledge=[],
        style=["../corpus/q.jsonl"],
    )
    assert [(c.text, c.ref) for c in chunks_of(config)] == [
        ("First quote.", "corpus/q.jsonl:1"),
        ("Second quote.", "corpus/q.jsonl:3"),
    ]


@pytest.mark.parametrize(
    ("line", "where"),
    [('{"txt": "no text field"}', "q.jsonl:2"), ('{"text": 5}', "q.jsonl:2"), ("[1, 2]", "q.jsonl:2")],
)
def test_jsonl_without_string_text_names_file_and_line(tmp_path: Path, line: str, where: str) -> None:
    config = make_project(
        tmp_path, {"corpus/q.jsonl": '{"text": "fine"}\n' + line + "\n"}, knowledge=[], style=["../corpus/*"]
    )
    with pytest.raises(UserError, match=rf'{where}: needs a string "text" field'):
        chunks_of(config)


def test_jsonl_broken_json_names_line(tmp_path: Path) -> None:
    config = make_project(
        tmp_path, {"corpus/q.jsonl": '{"text": "a"}\n{"text": \n'}, knowledge=[], style=["../corpus/*"]
    )
    with pytest.raises(UserError, match=r"q.jsonl:2: not valid JSON"):
        chunks_of(config)


def test_non_utf8_file_is_a_user_error_naming_it(tmp_path: Path) -> None:
    config = make_project(
        tmp_path,
        {"corpus/latin1.txt": "caf\u00e9 ok\n\nna\u00efve".encode("latin-1")},
        knowledge=["../corpus/*"],
        style=[],
    )
    with pytest.raises(UserError, match=r"latin1.txt:1: not valid UTF-8.*re-save the file as UTF-8"):
        chunks_of(config)


def test_binary_file_is_a_user_error_naming_it(tmp_path: Path) -> None:
    config = make_project(
        tmp_path,
        {"corpus/image.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"},
        knowledge=["../corpus/*"],
        style=[],
    )
    with pytest.raises(UserError, match=r"image.txt: looks like a binary file"):
        chunks_of(config)


def test_utf8_bom_and_crlf_are_read(tmp_path: Path) -> None:
    config = make_project(
        tmp_path, {"corpus/w.txt": "\ufeffOne.\r\n\r\nTwo.\r\n".encode()}, knowledge=["../corpus/*"], style=[]
    )
    assert [(c.text, c.ref) for c in chunks_of(config)] == [
        ("One.", "corpus/w.txt:1"),
        ("Two.", "corpus/w.txt:3"),
    ]


def test_duplicates_and_empty_paragraphs_dropped_per_kind(tmp_path: Path) -> None:
    config = make_project(
        tmp_path,
        {
            "corpus/a.txt": "Same text.\n\n   \n\nOther text.\n\nSame   text.\n",
            "corpus/b.txt": "Same text.\n\nNew text.\n",
            "corpus/style.txt": "Same text.\n",
        },
        knowledge=["../corpus/a.txt", "../corpus/b.txt"],
        style=["../corpus/style.txt"],
    )
    chunks = chunks_of(config)
    assert [(c.kind, c.text, c.ref) for c in chunks] == [
        ("knowledge", "Same text.", "corpus/a.txt:1"),
        ("knowledge", "Other text.", "corpus/a.txt:5"),
        ("knowledge", "New text.", "corpus/b.txt:3"),
        ("style", "Same text.", "corpus/style.txt:1"),
    ]
    assert len({c.id for c in chunks}) == len(chunks)


def test_over_long_paragraph_split_at_sentences_with_piece_lines(tmp_path: Path) -> None:
    sentences = [" ".join(f"s{n}w{i}" for i in range(6)) + "." for n in range(6)]
    # Two sentences per line, lines 3-5 of the file.
    body = "\n".join(" ".join(sentences[i : i + 2]) for i in range(0, 6, 2))
    config = make_project(
        tmp_path, {"corpus/long.txt": "Intro.\n\n" + body + "\n"}, ["../corpus/*"], [], max_words=12
    )
    chunks = chunks_of(config)
    assert [c.words for c in chunks] == [1, 12, 12, 12]
    assert [c.ref for c in chunks] == [
        "corpus/long.txt:1",
        "corpus/long.txt:3",
        "corpus/long.txt:4",
        "corpus/long.txt:5",
    ]
    assert chunks[1].text == " ".join(sentences[:2])
    assert all(c.text.endswith(".") for c in chunks)


def test_files_outside_the_project_get_relative_refs(tmp_path: Path) -> None:
    outside = tmp_path / "shared" / "speech.txt"
    outside.parent.mkdir()
    outside.write_text("President: Ada\n\nFellow citizens.\n", encoding="utf-8")
    config = make_project(tmp_path / "proj", {}, knowledge=[], style=[str(outside)])
    assert [c.ref for c in chunks_of(config)] == ["../shared/speech.txt:1", "../shared/speech.txt:3"]
