"""Dialogue material: each layout read from a small file of our own making, exchanges built from the real
turns, held-out exchanges kept out of training, and the bad inputs that are one line and exit 2."""

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from persllm.config.stages import AnnotateSettings, CurateSettings, IndexSettings
from persllm.errors import UserError
from persllm.persona.chat_formats import Message, read_messages
from persllm.persona.dialogue import Exchange, exchanges_of, without_heldout
from persllm.persona.heldout import HoldoutRule, split_exchanges

KEEPER = ["Elsie", "Elsie Marr"]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_transcript_reads_speakers_continuations_directions_and_scenes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "interview.txt",
        "# Scene one\n"
        "VISITOR: Do you ever sleep?\n"
        "[She laughs.]\n"
        "ELSIE MARR: In winter, a little.\n"
        "More in spring.\n"
        "\n"
        "---\n"
        "Visitor: Is the lamp heavy?\n"
        "Elsie: Heavier than it looks.\n",
    )
    layout, messages = read_messages(path)
    assert layout == "transcript"
    assert [(m.speaker, m.text, m.line, m.conversation) for m in messages] == [
        ("VISITOR", "Do you ever sleep?", 2, 1),
        ("ELSIE MARR", "In winter, a little. More in spring.", 4, 1),
        ("Visitor", "Is the lamp heavy?", 8, 2),
        ("Elsie", "Heavier than it looks.", 9, 2),
    ]
    found = exchanges_of(messages, KEEPER, "corpus/interview.txt", context_turns=3, gap_hours=6)
    assert [e.turns for e in found] == [
        [
            {"role": "user", "content": "Do you ever sleep?"},
            {"role": "assistant", "content": "In winter, a little. More in spring."},
        ],
        [  # a new scene: the first scene is not its context
            {"role": "user", "content": "Is the lamp heavy?"},
            {"role": "assistant", "content": "Heavier than it looks."},
        ],
    ]
    assert [e.ref for e in found] == ["corpus/interview.txt:4", "corpus/interview.txt:9"]


def test_jsonl_with_speakers_times_and_conversations(tmp_path: Path) -> None:
    rows = [
        {"speaker": "Tom", "text": "Storm tonight?", "timestamp": "2021-03-04T20:00:00", "conversation": "a"},
        {"speaker": "Elsie", "text": "By midnight.", "timestamp": "2021-03-04T20:01:00", "conversation": "a"},
        {"name": "Tom", "content": "Boats in?", "time": 1614888120, "conversation": "a"},
        {"from": "Elsie", "message": "All but one.", "date": "2021-03-04T20:03:00Z", "conversation": "a"},
        {"speaker": "Tom", "text": "Hello again.", "conversation": "b"},
        {"speaker": "Elsie", "text": "Hello.", "conversation": "b"},
    ]
    path = write(tmp_path, "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    layout, messages = read_messages(path)
    assert layout == "jsonl"
    assert messages[1].time == datetime(2021, 3, 4, 20, 1)
    assert messages[3].time == datetime(2021, 3, 4, 20, 3)
    assert [m.conversation for m in messages] == [0, 0, 0, 0, 1, 1]
    found = exchanges_of(messages, KEEPER, "chat.jsonl", context_turns=3, gap_hours=6)
    assert [len(e.turns) for e in found] == [2, 4, 2]
    assert found[1].turns[0]["content"] == "Storm tonight?" and found[1].reply == "All but one."
    assert found[1].time == "2021-03-04T20:03:00"


def test_a_whatsapp_export_in_both_layouts_with_day_order_read_from_the_file(tmp_path: Path) -> None:
    ios = write(
        tmp_path,
        "ios.txt",
        "[04/03/2021, 20:00:00] Messages and calls are end-to-end encrypted.\n"
        "[04/03/2021, 20:00:05] Tom Reed: Storm tonight?\n"
        "[04/03/2021, 20:00:09] Elsie: By midnight.\n"
        "Keep the boats in.\n"
        "[04/03/2021, 20:01:00] Tom Reed: <Media omitted>\n"
        "[25/03/2021, 08:00:00] Tom Reed: Morning!\n"
        "[25/03/2021, 08:02:00] Elsie: Morning, Tom.\n",
    )
    layout, messages = read_messages(ios)
    assert layout == "whatsapp"
    assert [(m.speaker, m.text) for m in messages] == [
        ("Tom Reed", "Storm tonight?"),
        ("Elsie", "By midnight. Keep the boats in."),
        ("Tom Reed", "Morning!"),
        ("Elsie", "Morning, Tom."),
    ]
    assert messages[1].time == datetime(2021, 3, 4, 20, 0, 9)  # day first: 25/03 says so
    found = exchanges_of(messages, KEEPER, "ios.txt", context_turns=3, gap_hours=6)
    assert [len(e.turns) for e in found] == [2, 2]  # three weeks apart: two conversations

    android = write(
        tmp_path,
        "android.txt",
        "3/25/21, 8:00 PM - Tom Reed: Morning!\n3/25/21, 8:02 PM - Elsie: Evening, Tom.\n",
    )
    layout, messages = read_messages(android)
    assert layout == "whatsapp"
    assert messages[1].time == datetime(2021, 3, 25, 20, 2)  # month first: 25 cannot be a month


def test_a_telegram_export_of_one_chat_or_all_chats(tmp_path: Path) -> None:
    chat = {
        "name": "Tom Reed",
        "type": "personal_chat",
        "messages": [
            {"id": 1, "type": "service", "date": "2021-03-04T19:00:00", "action": "phone_call"},
            {"id": 2, "type": "message", "date": "2021-03-04T20:00:00", "from": "Tom Reed", "text": "Storm?"},
            {
                "id": 3,
                "type": "message",
                "date": "2021-03-04T20:01:00",
                "from": "Elsie",
                "text": ["By ", {"type": "bold", "text": "midnight"}, "."],
            },
            {"id": 4, "type": "message", "date": "2021-03-04T20:02:00", "from": "Tom Reed", "text": ""},
        ],
    }
    one = write(tmp_path, "result.json", json.dumps(chat))
    layout, messages = read_messages(one)
    assert layout == "telegram"
    assert [(m.speaker, m.text) for m in messages] == [("Tom Reed", "Storm?"), ("Elsie", "By midnight.")]
    every = write(tmp_path, "all.json", json.dumps({"chats": {"list": [chat, chat]}}))
    _, messages = read_messages(every)
    assert [m.conversation for m in messages] == [0, 0, 1, 1]


def test_a_sillytavern_chat_skips_its_metadata_and_system_lines(tmp_path: Path) -> None:
    rows = [
        {"user_name": "You", "character_name": "Elsie", "create_date": "2024-05-01@10h00m00s"},
        {"name": "Elsie", "is_user": False, "send_date": "May 1, 2024 10:00am", "mes": "Welcome ashore."},
        {"name": "You", "is_user": True, "send_date": "May 1, 2024 10:01am", "mes": "Is the lamp lit?"},
        {"name": "System", "is_system": True, "mes": "[Elsie is typing]"},
        {"name": "Elsie", "is_user": False, "send_date": "May 1, 2024 10:02am", "mes": "Since dusk."},
    ]
    path = write(tmp_path, "Elsie - 2024-05-01.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    layout, messages = read_messages(path)
    assert layout == "sillytavern"
    assert [m.speaker for m in messages] == ["Elsie", "You", "Elsie"]
    assert messages[2].time == datetime(2024, 5, 1, 10, 2)
    found = exchanges_of(messages, KEEPER, "st.jsonl", context_turns=3, gap_hours=6)
    # The greeting opens the chat (no one spoke before it): only the reply to a real turn is an exchange.
    assert [e.turns for e in found] == [
        [{"role": "user", "content": "Is the lamp lit?"}, {"role": "assistant", "content": "Since dusk."}]
    ]


def test_context_is_capped_opens_on_a_user_turn_and_names_several_speakers() -> None:
    said = ["A: one", "Elsie: two", "B: three", "Elsie: four", "A: five", "Elsie: six"]
    messages = [Message(s.split(": ")[0], s.split(": ")[1], n) for n, s in enumerate(said, start=1)]
    found = exchanges_of(messages, KEEPER, "x.txt", context_turns=2, gap_hours=6)
    last = found[-1]
    assert [t["role"] for t in last.turns] == ["user", "assistant", "user", "assistant"]
    assert last.turns[0]["content"] == "B: three"  # two speakers besides the persona: each turn says who
    assert last.blocks == (2, 5)


def exchange(conversation: int, start: int, end: int, reply: str) -> Exchange:
    turns = [
        {"role": "user" if i % 2 == (start % 2) else "assistant", "content": f"t{i}"}
        for i in range(start, end)
    ]
    turns.append({"role": "assistant", "content": reply})
    return Exchange(turns, f"talk.txt:{end}", None, conversation, (start, end))


def test_no_held_out_reply_stays_in_a_training_context() -> None:
    talk = [exchange(0, max(0, end - 5), end, f"reply {end}") for end in range(1, 20, 2)]
    train, held = split_exchanges(talk, HoldoutRule(0.3, 2, None, 3), seed=3, where="p/s")
    assert len(held) == 3 and len(train) + len(held) <= len(talk)
    held_ends = {e.blocks[1] for e in held}
    for kept in train:
        start, end = kept.blocks
        assert not any(start <= h < end for h in held_ends)
        assert kept.turns[0]["role"] == "user" and kept.turns[-1]["role"] == "assistant"
    assert split_exchanges(talk, HoldoutRule(0.3, 2, None, 3), seed=3, where="p/s")[1] == held
    assert without_heldout(talk, []) == talk


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("notes.txt", "just some prose\nwith no speakers\n", "no dialogue layout recognised"),
        ("chat.json", json.dumps({"data": []}), "must be a Telegram export"),
        ("chat.jsonl", '{"who": "Tom", "said": "hi"}\n', r"chat.jsonl:1: a dialogue line needs a speaker"),
        ("bad.jsonl", '{"speaker": "Tom", "text": "hi", "time": "yesterday"}\n', "not ISO 8601"),
    ],
)
def test_an_unknown_layout_is_one_line_naming_the_file(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        read_messages(write(tmp_path, name, text))


# --------------------------------------------------------------------------- through the pipeline

TOPICS = [
    (
        "Do you trim the wick yourself every evening?",
        "Every evening at dusk, with the small scissors my father keeps in the drawer.",
    ),
    (
        "Is it lonely up here in winter?",
        "Lonely is a word for people with time to spare; I have the log, the lamp and the glass.",
    ),
    (
        "Why do you write everything in that book?",
        "Because a memory bends to suit its owner, and ink does not.",
    ),
    (
        "Have the herring boats come in yet?",
        "All but the Mary Pell, and she was seen rounding the skerry an hour ago.",
    ),
    (
        "Can a girl really keep a light?",
        "A girl kept this one through the gale of eighty-one while the men argued below.",
    ),
    (
        "What does the barometer say today?",
        "Falling since noon, slowly; expect the wind to back westerly before midnight.",
    ),
    (
        "You must be the bravest woman in Carrow Bay.",
        "Bravery is for people who have not read the tide tables; I simply read them.",
    ),
    (
        "How much oil does the lamp burn in a night?",
        "Near three gallons on a long December night, less in summer, all of it recorded.",
    ),
    (
        "Did the inspector come this spring?",
        "He came in April, found one smudged pane, and wrote two pages about it.",
    ),
    (
        "Is the fog signal working again?",
        "It works when the cranks are oiled, which is every morning whether it is foggy or not.",
    ),
    ("Who taught you the signals?", "My father taught me the flags and the almanac taught me the rest."),
    (
        "Will you ever leave the Point?",
        "Not while the lamp needs a steady hand and the council needs reminding of it.",
    ),
]
TALK = "# Visits to the lamp room\n" + "".join(
    f"VISITOR: {question}\nELSIE: {answer}\n" + ("---\n" if n % 3 == 2 else "")
    for n, (question, answer) in enumerate(TOPICS)
)


@pytest.fixture(scope="module")
def talked(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import shutil

    import yaml

    from persllm import annotate, curate, index
    from persllm.config import load_project
    from tests.conftest import EXAMPLE
    from tests.fake_openai import FakeOpenAI
    from tests.test_heldout import back_writer, configure, without_dialogue

    root = tmp_path_factory.mktemp("dialogue") / "demo"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("runs"))
    (root / "talk").mkdir()
    (root / "talk" / "keeper.txt").write_text(TALK)
    persona_path = root / "personas" / "elsie.yaml"
    persona = yaml.safe_load(persona_path.read_text())
    persona["speakers"] = ["Elsie"]
    persona["stages"][0]["dialogue"] = ["../talk/keeper.txt"]
    del persona["stages"][1]["dialogue"]  # this module's transcript only
    persona_path.write_text(yaml.safe_dump(persona, sort_keys=False))
    without_dialogue(root / "personas" / "jonah.yaml")
    with FakeOpenAI(default_reply=back_writer) as server:
        configure(root / "persllm.yaml", server.base_url)
        project = load_project(root / "persllm.yaml")
        built = index.run(*IndexSettings.of_project(project))
        annotated = annotate.run(*AnnotateSettings.of_project(project), progress=False)
        curate.run(*CurateSettings.of_project(project))
    return project, built, annotated


@pytest.mark.slow
def test_real_exchanges_train_as_they_are_and_held_out_ones_are_asked_as_they_were(talked: Any) -> None:
    from persllm.evaluate.systems import System, load_heldout_items, messages_for
    from persllm.jsonl import read_jsonl

    project, built, annotated = talked
    keeper = next(row for row in built["stages"] if (row["persona"], row["stage"]) == ("elsie", "keeper"))
    assert keeper["exchanges"] + keeper["heldout_exchanges"] <= 12 and keeper["heldout_exchanges"] >= 2
    layout = project.layout
    real = [r for r in read_jsonl(layout.dialogues("elsie")) if r["reply"]["source"] == "dialogue"]
    held = [r for r in read_jsonl(layout.heldout_questions("elsie")) if r["reply"].get("question") == "real"]
    assert len(real) == keeper["exchanges"] and len(held) == keeper["heldout_exchanges"]
    assert annotated["real_dialogues"]["dialogue"] == len(real)
    assert all(
        r["annotator"] is None and r["turns"][0]["content"].startswith("VISITOR") is False for r in real
    )
    # Held-out replies appear in no training file, not even as the context of a later exchange.
    for record in held:
        reply = record["turns"][-1]["content"]
        for path in [layout.dialogues("elsie"), *layout.root.glob("data/*/*.jsonl")]:
            assert reply not in path.read_text()
    # Every real exchange that passed curation trains (none is in the test split).
    train = read_jsonl(layout.sft_train("elsie"))
    trained = {row["messages"][-1]["content"] for row in train}
    assert {r["turns"][-1]["content"] for r in real} <= trained | set()
    assert not {r["turns"][-1]["content"] for r in real} & {
        row["messages"][-1]["content"] for row in read_jsonl(layout.sft_test("elsie"))
    }
    # The evaluation asks the real turns before the reply; the trained system sees the label first.
    items = [
        i
        for i in load_heldout_items(project.workspace, None)
        if i.reference in {r["turns"][-1]["content"] for r in held}
    ]
    assert len(items) == len(held)
    longest = max(items, key=lambda i: len(i.history))
    record = next(r for r in held if r["turns"][-1]["content"] == longest.reference)
    assert longest.question == record["turns"][-2]["content"]
    trained_system = System("sft", project.config.base_model, "trained")
    messages = messages_for(trained_system, longest)
    assert [m["role"] for m in messages] == ["system", *[t["role"] for t in record["turns"][:-1]]]
    assert messages[1]["content"].startswith(f"{longest.label} ")


@pytest.mark.slow
def test_rerunning_annotate_writes_no_real_exchange_twice(talked: Any) -> None:
    from persllm import annotate
    from persllm.jsonl import read_jsonl

    project, _, _ = talked
    before = len(read_jsonl(project.layout.dialogues("elsie")))
    again = annotate.run(*AnnotateSettings.of_project(project), progress=False)
    assert again["real_dialogues"]["dialogue"] == 0 and again["real_dialogues"]["heldout"] == 0
    assert len(read_jsonl(project.layout.dialogues("elsie"))) == before


def persllm_index(root: Path) -> Any:
    import subprocess
    import sys

    persllm = Path(sys.executable).with_name("persllm")
    return subprocess.run(
        [str(persllm), "index", str(root / "persllm.yaml")], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("never_speaks", "Elsie Wren never speaks here (speakers found: KEEPER, VISITOR)"),
        ("outside", "is outside every stage of 'elsie'"),
        ("no_dates", "dated chats need stages with `since` / `until` dates"),
    ],
)
def test_bad_dialogue_material_is_exit_2_with_one_line_and_no_index(
    tmp_path: Path, change: str, message: str
) -> None:
    import shutil

    import yaml

    from tests.conftest import EXAMPLE

    root = tmp_path / "demo"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("runs"))
    persona_path = root / "personas" / "elsie.yaml"
    persona = yaml.safe_load(persona_path.read_text())
    (root / "talk").mkdir()
    if change == "never_speaks":
        (root / "talk" / "t.txt").write_text("VISITOR: Anyone here?\nKEEPER: Only me.\n")
        persona["stages"][0]["dialogue"] = ["../talk/t.txt"]
    else:
        rows = [
            {"speaker": "Tom", "text": "Storm?", "timestamp": "1950-01-01T10:00:00"},
            {"speaker": "Elsie", "text": "Tonight.", "timestamp": "1950-01-01T10:01:00"},
        ]
        (root / "talk" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        persona["dialogue"] = ["../talk/chat.jsonl"]
        persona["speakers"] = ["Elsie"]
        if change == "outside":
            persona["stages"][0].update({"since": "1880-01-01", "until": "1899-12-31"})
            persona["stages"][1].update({"since": "1900-01-01", "until": "1910-12-31"})
    persona_path.write_text(yaml.safe_dump(persona, sort_keys=False))
    result = persllm_index(root)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (root / "runs" / "demo" / "index").exists()


def garbage_writer(body: dict[str, Any]) -> str:
    """A scripted annotator as weak as a 135M model on a biography: narration and prompt scaffolding."""
    prompt = body["messages"][-1]["content"]
    if "RESPONSE:" in prompt:
        return (
            "ANALYSIS: The task is to write short notes.\n"
            "RESPONSE: As the notes say [corpus/elsie/keeper/knowledge.md:7], Elsie Wren keeps the light."
        )
    return "Elsie Wren walked up to the lighthouse in the evening."


@pytest.mark.slow
def test_a_biography_only_project_stops_before_training_naming_the_annotator(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    import yaml

    from tests.conftest import EXAMPLE
    from tests.fake_openai import FakeOpenAI

    root = tmp_path / "demo"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("runs"))
    for persona_path in (root / "personas").glob("*.yaml"):
        persona = yaml.safe_load(persona_path.read_text())
        for stage in persona["stages"]:
            stage.pop("style")
            stage.pop("dialogue", None)
        persona_path.write_text(yaml.safe_dump(persona, sort_keys=False))
    config = yaml.safe_load((root / "persllm.yaml").read_text())
    config["holdout"] = {"share": 0}
    config["annotate"] = {
        "counts": {"ordinary": 3, "misleading": 0, "opinion": 0},
        "own_words_share": {"ordinary": 0.0, "opinion": 0.0},
        "output": "delimited",
        "multi_turn_share": 0,
    }
    with FakeOpenAI(default_reply=garbage_writer) as server:
        config["annotator"] = {
            "backend": "openai",
            "model": "fake-model",
            "base_url": server.base_url,
            "structured_output": "off",
            "max_retries": 1,
        }
        (root / "persllm.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        persllm = Path(sys.executable).with_name("persllm")
        result = subprocess.run(
            [str(persllm), "run", str(root / "persllm.yaml"), "--to", "sft"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "warning: every training reply of elsie/keeper will be written by the annotator" in result.stderr
    assert lines[-1].startswith("error: annotator fake-model: only 0 of 6 dialogues it wrote for 'elsie'")
    assert "prompt_words 6" in lines[-1] and "stronger annotator" in lines[-1]
    assert not (root / "runs" / "demo" / "models").exists()
    assert not (root / "runs" / "demo" / "data" / "elsie" / "sft_train.jsonl").exists()
