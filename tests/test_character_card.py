"""Character Cards: V2 and V3 read from JSON and PNG into a project, V3 written from a persona, the round
trip (import -> export -> import gives the same persona), and the bad cards that are exit 2."""

import base64
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from persllm.persona.character_card import (
    ENTRY_REQUIRED,
    PNG_SIGNATURE,
    V3_REQUIRED,
    card_problems,
    png_chunks,
    png_text,
    png_with_card,
    read_card,
)
from tests.test_cli_project import run_main

CARD_DATA: dict[str, Any] = {
    "name": "Captain Mira Holt",
    "description": "{{char}} commands the salvage tug Petrel out of Carrow Bay. She trusts engines.",
    "personality": "Blunt, patient with engines, impatient with owners.",
    "scenario": "The year is 1912. {{user}} has come aboard the Petrel at dawn.",
    "first_mes": "You're late. The tide isn't.",
    "alternate_greetings": ["Mind the coil of wire, {{user}}; it bites."],
    "mes_example": (
        "<START>\n{{user}}: Why do you still run a steam tug?\n"
        "{{char}}: Because steam forgives a tired crew, and oil engines forgive nobody.\n"
        "<START>\n{{user}}: Is salvage profitable?\n"
        "{{char}}: Only if you count the ships we bring home, not the nights we spend doing it."
    ),
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "tags": ["sea"],
    "creator": "a test",
    "character_version": "1",
    "extensions": {},
    "character_book": {
        "extensions": {},
        "entries": [
            {
                "keys": ["Petrel"],
                "content": "The Petrel is a steam salvage tug built in 1894 at Leith, refitted twice.",
                "extensions": {},
                "enabled": True,
                "insertion_order": 0,
            },
            {
                "keys": ["winch"],
                "content": "{{char}} lost two fingers to the Petrel's stern winch in the gale of 1909.",
                "extensions": {},
                "enabled": True,
                "insertion_order": 1,
            },
        ],
    },
}


def v2_card() -> dict[str, Any]:
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": json.loads(json.dumps(CARD_DATA))}


def png_file(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file of these (type, data) chunks, each with its length and CRC, as an app writes one."""
    return PNG_SIGNATURE + b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in chunks
    )


def png_of(keyword: str, card: dict[str, Any]) -> bytes:
    """A 1x1 PNG whose one text chunk ``keyword`` carries ``card``, base64-encoded."""
    image = [(k, d) for k, d in png_chunks(png_with_card(v2_card())) if k != b"tEXt"]
    text = (b"tEXt", keyword.encode() + b"\x00" + base64.b64encode(json.dumps(card).encode()))
    return png_file([image[0], text, *image[1:]])


def test_v2_json_v3_png_and_v2_png_read_the_same_data(tmp_path: Path) -> None:
    v2 = v2_card()
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {**CARD_DATA, "group_only_greetings": []}}
    (tmp_path / "c.json").write_text(json.dumps(v2))
    (tmp_path / "v3.png").write_bytes(png_of("ccv3", v3))
    (tmp_path / "v2.png").write_bytes(png_of("chara", v2))
    assert read_card(tmp_path / "c.json")["data"]["name"] == "Captain Mira Holt"
    assert read_card(tmp_path / "v3.png")["spec"] == "chara_card_v3"
    assert read_card(tmp_path / "v2.png")["data"]["mes_example"] == CARD_DATA["mes_example"]
    both = png_with_card({"spec": "chara_card_v3", "spec_version": "3.0", "data": v3["data"]})
    texts = dict(t for k, d in png_chunks(both) if (t := png_text(k, d)))
    assert set(texts) == {"chara", "ccv3"}  # V3 for new apps, the same data as V2 for old ones


def test_init_from_a_card_writes_persona_and_corpus_that_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = tmp_path / "mira.json"
    card.write_text(json.dumps(v2_card()))
    target = tmp_path / "harbour"
    code, out, err = run_main(["init", str(target), "--from-card", str(card)], capsys)
    assert code == 0, err
    assert "persllm project 'harbour'" in out and "persona 'captain-mira-holt'" in out
    persona = yaml.safe_load((target / "personas" / "captain-mira-holt.yaml").read_text())
    assert persona["name"] == "Captain Mira Holt" and persona["speakers"] == ["Captain Mira Holt"]
    assert [s["id"] for s in persona["stages"]] == ["card"]
    assert persona["stages"][0]["time"] == "The year is 1912."
    folder = target / "corpus" / "captain-mira-holt" / "card"
    knowledge = (folder / "knowledge.md").read_text()
    assert "Captain Mira Holt commands the salvage tug" in knowledge and "built in 1894 at Leith" in knowledge
    assert "{{char}}" not in knowledge and "User has come aboard" in knowledge
    assert (folder / "greetings.txt").read_text().startswith("You're late.")
    transcript = (folder / "dialogue" / "examples.txt").read_text()
    assert transcript.splitlines()[:2] == [
        "User: Why do you still run a steam tug?",
        "Captain Mira Holt: Because steam forgives a tired crew, and oil engines forgive nobody.",
    ]
    assert not (target / "personas" / "wren.yaml").exists()  # the starter persona is not copied

    config = target / "persllm.yaml"
    code, out, err = run_main(["index", str(config), "--set", "holdout.share=0"], capsys)
    assert code == 0, err
    row = next(line.split() for line in out.splitlines() if line.startswith("captain-mira-holt"))
    assert row[6] == "2"  # the two example exchanges


def test_a_card_round_trips_through_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = tmp_path / "mira.json"
    card.write_text(json.dumps(v2_card()))
    first = tmp_path / "first"
    assert run_main(["init", str(first), "--from-card", str(card)], capsys)[0] == 0
    config = str(first / "persllm.yaml")
    assert run_main(["index", config, "--set", "holdout.share=0"], capsys)[0] == 0
    for name in ("out.json", "out.png"):
        code, out, err = run_main(["export", config, "--card", str(tmp_path / name)], capsys)
        assert code == 0, err
        assert "Character Card V3 with" in out
    exported = json.loads((tmp_path / "out.json").read_text())
    assert card_problems(exported) == []
    assert exported["spec"] == "chara_card_v3" and exported["spec_version"] == "3.0"
    assert set(V3_REQUIRED) <= set(exported["data"])
    entries = exported["data"]["character_book"]["entries"]
    assert entries and all(set(ENTRY_REQUIRED) <= set(e) for e in entries)
    assert exported["data"]["extensions"]["persllm"]["stages"] == [
        {"id": "card", "time": "The year is 1912."}
    ]
    assert "{{user}}: Why do you still run a steam tug?" in exported["data"]["mes_example"]
    assert read_card(tmp_path / "out.png")["data"] == exported["data"]
    # Readers of V1 cards find the V1 fields at the top level, as SillyTavern writes them.
    assert exported["name"] == "Captain Mira Holt" and exported["first_mes"] == exported["data"]["first_mes"]

    for index, source in enumerate(("out.json", "out.png")):
        again = tmp_path / f"again{index}"
        assert run_main(["init", str(again), "--from-card", str(tmp_path / source)], capsys)[0] == 0
        persona = "personas/captain-mira-holt.yaml"
        assert yaml.safe_load((again / persona).read_text()) == yaml.safe_load((first / persona).read_text())
        for path in (first / "corpus").rglob("*.md"):
            kept = sorted(p.strip() for p in path.read_text().split("\n\n") if p.strip())
            back = (again / path.relative_to(first)).read_text()
            assert sorted(p.strip() for p in back.split("\n\n") if p.strip()) == kept


@pytest.mark.slow
def test_the_example_personas_export_with_their_stages_and_real_exchanges(
    example_project: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run_main(["index", str(example_project)], capsys)[0] == 0
    out = tmp_path / "elsie.json"
    code, _, err = run_main(
        ["export", str(example_project), "--card", str(out), "--persona", "elsie", "--stage", "keeper"],
        capsys,
    )
    assert code == 0, err
    card = json.loads(out.read_text())
    assert card_problems(card) == []
    ours = card["data"]["extensions"]["persllm"]
    assert [s["id"] for s in ours["stages"]] == ["keeper", "engineer"] and ours["stage"] == "keeper"
    assert card["data"]["scenario"].startswith("It is 1889")
    stages = {e["extensions"]["persllm"]["stage"] for e in card["data"]["character_book"]["entries"]}
    assert stages == {"keeper", "engineer"}
    assert card["data"]["mes_example"].count("<START>") == 3 and "{{char}}: " in card["data"]["mes_example"]
    assert "Elsie Wren" in card["data"]["system_prompt"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("odd.json", {"spec": "chara_card_v9", "spec_version": "9.0", "data": {}}, "unknown card spec"),
        ("blank.png", None, "this PNG holds no character card"),
        ("noname.json", {"spec": "chara_card_v2", "data": {"description": "x"}}, "without data.name"),
    ],
)
def test_a_bad_card_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: Any, message: str
) -> None:
    card = tmp_path / name
    if content is None:
        card.write_bytes(png_file([(k, d) for k, d in png_chunks(png_with_card(v2_card())) if k != b"tEXt"]))
    else:
        card.write_text(json.dumps(content))
    target = tmp_path / "new"
    code, out, err = run_main(["init", str(target), "--from-card", str(card)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert message in err and str(card) in err
    assert not target.exists()


def test_export_card_refuses_a_wrong_suffix(
    example_project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["export", str(example_project), "--card", "x.txt", "--persona", "elsie"], capsys)
    assert code == 2 and "name the card FILE.json or FILE.png" in err
    shutil.rmtree(example_project.parent / "runs", ignore_errors=True)
