"""Curation: filters, dedup, split, stage tokens, CoT rendering, general-data mixing, stats, CLI."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from persllm import curate
from persllm.config import CurateConfig, EmbedderConfig, PersonaConfig, load_project
from persllm.config.stages import CurateSettings
from persllm.curate.dedup import dedup
from persllm.curate.filters import check_record, echo_share, word_overlap
from persllm.curate.split import held_out_count, split_records
from persllm.errors import UserError
from persllm.jsonl import read_jsonl, write_jsonl
from persllm.prompting import render_inline, split_inline, system_prompt

ANALYSIS = "The user asks about the light; I kept it alone in 1884 and remember it well."


# --------------------------------------------------------------------------- a small project


def make_project(
    root: Path, annotations: dict[str, list[dict[str, Any]]] | None = None, **config: Any
) -> Path:
    """Two personas (elsie: keeper, engineer with a custom label; jonah: sailor) and their annotations."""
    (root / "corpus").mkdir(parents=True)
    (root / "personas").mkdir()
    for name in ("keeper", "engineer", "sailor"):
        (root / "corpus" / f"{name}.md").write_text(f"The {name} stage material.\n\nA second paragraph.\n")
    elsie = {
        "id": "elsie",
        "name": "Elsie Wren",
        "profile": "A lighthouse keeper's daughter who\n trusts written records.",
        "stages": [
            {"id": "keeper", "time": "It is 1889, at Skerrow Point.", "knowledge": ["../corpus/keeper.md"]},
            {
                "id": "engineer",
                "time": "It is 1905, in Carrow Bay.",
                "label": "<ENGINEER>",
                "knowledge": ["../corpus/engineer.md"],
            },
        ],
    }
    jonah = {
        "id": "jonah",
        "name": "Jonah Crane",
        "profile": "A fisherman who distrusts the Board.",
        "stages": [
            {
                "id": "sailor",
                "time": "It is 1880, on the herring boats.",
                "knowledge": ["../corpus/sailor.md"],
            }
        ],
    }
    (root / "personas" / "elsie.yaml").write_text(yaml.safe_dump(elsie))
    (root / "personas" / "jonah.yaml").write_text(yaml.safe_dump(jonah))
    project = {"project": "t", "run_dir": "runs", "personas": ["personas/*.yaml"], "seed": 3, **config}
    (root / "persllm.yaml").write_text(yaml.safe_dump(project))
    for persona, records in (annotations or {}).items():
        write_jsonl(root / "runs" / "annotations" / f"{persona}.jsonl", records)
    return root / "persllm.yaml"


def record(
    rid: str,
    question: str,
    answer: str = "I kept the lamp burning for forty-one nights before the inspector came.",
    *,
    persona: str = "elsie",
    stage: str = "keeper",
    kind: str = "ordinary",
    analysis: str = ANALYSIS,
    more: list[tuple[str, str, str]] | None = None,
) -> dict[str, Any]:
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": question},
        {"role": "assistant", "analysis": analysis, "content": answer},
    ]
    for user, reply_analysis, reply in more or []:
        turns += [
            {"role": "user", "content": user},
            {"role": "assistant", "analysis": reply_analysis, "content": reply},
        ]
    return {
        "id": rid,
        "persona": persona,
        "stage": stage,
        "kind": kind,
        "seed": {"source": "knowledge", "ref": "corpus/keeper.md:1", "text": "material"},
        "turns": turns,
        "context": {"knowledge": "", "style": ""},
        "annotator": {"backend": "openai", "model": "fake", "params": {}},
    }


TOPICS = [
    "How many steps lead up to the lamp room of your tower?",
    "What did the district inspector think of a young woman keeping the light?",
    "Why did you write four letters to the Lights Board about your pay?",
    "Who taught you navigation and where did you learn the tides?",
    "What happened when the brig struck the Ledges in the gale?",
    "How often must the clockwork weight be wound during the night?",
    "What do the fishermen say about the weather at the Three Tuns?",
    "Is it true that the lens was made in Paris by a famous optician?",
    "Do you think women should be allowed to keep lighthouses?",
    "What is the character of the Skerrow Point light for passing mariners?",
    "How did your father die, and what did you do that night?",
    "What do you make of the new steam trawlers in the bay?",
    "Which books did Captain Haddow lend you, and did you return them?",
    "Why do you refuse to let visitors touch the great glass lens?",
    "Would an electric lamp be better than the old oil lamp, in your view?",
    "What does your sister Maud write to you about from the town?",
    "How much oil does the lamp burn on a long winter night?",
    "Surely the harbour wall was built by the Romans, was it not?",
    "What is the worst storm you have recorded in your logbook?",
    "Do you believe the Board treats its keepers fairly?",
]


def many(
    persona: str = "elsie", stage: str = "keeper", kind: str = "ordinary", n: int = 10, start: int = 0
) -> list[dict[str, Any]]:
    """``n`` valid records with distinct questions ``TOPICS[start:start + n]``."""
    return [
        record(f"{persona}-{stage}-{kind}-{i}", TOPICS[start + i], persona=persona, stage=stage, kind=kind)
        for i in range(n)
    ]


# --------------------------------------------------------------------------- filters (pure)


def test_each_check_catches_exactly_its_fault() -> None:
    cfg = CurateConfig(min_response_words=5, max_response_words=30, min_analysis_words=3, echo_threshold=0.8)
    good = record("a", TOPICS[0])
    assert check_record(good, cfg) is None
    broken = record("b", TOPICS[0])
    broken["turns"] = broken["turns"][:1]
    cases = {
        "malformed": broken,
        "unknown_stage": record("c", TOPICS[0], stage="pirate"),
        "empty": record("d", TOPICS[0], analysis="   "),
        "short_response": record("e", TOPICS[0], answer="One hundred twelve."),
        "long_response": record("f", TOPICS[0], answer=" ".join(["step"] * 31)),
        "short_analysis": record("g", TOPICS[0], analysis="Steps."),
        "echo": record("h", TOPICS[0], answer="How many steps lead up to the lamp room of your tower?"),
    }
    for expected, bad in cases.items():
        assert check_record(bad, cfg, {"keeper", "engineer"}) == expected, expected


def test_checks_apply_to_every_assistant_turn() -> None:
    cfg = CurateConfig()
    second_empty = record(
        "a", TOPICS[0], more=[("And then?", "", "Then I wound the clockwork again at eleven.")]
    )
    assert check_record(second_empty, cfg) == "empty"
    second_echo = record(
        "b", TOPICS[0], more=[("Did you sleep at all that night?", ANALYSIS, "Did you sleep at all?")]
    )
    assert check_record(second_echo, cfg) == "echo"


def test_word_overlap() -> None:
    assert word_overlap("The lamp, the LAMP!", "lamp the") == 1.0
    assert word_overlap("red sky", "blue sea") == 0.0
    assert word_overlap("a b c d", "a b") == 0.5
    assert echo_share("Did you sleep at all that night?", "Did you sleep at all?") == 1.0
    assert echo_share("Did you sleep?", "I slept badly, you know.") == 0.2


def test_system_prompt_is_pure_and_names_person_profile_and_time() -> None:
    stages = [{"id": "mate", "time": "It is 1890.", "knowledge": ["x"]}]
    persona = PersonaConfig.model_validate({"id": "p", "name": "Ada Thorne", "stages": stages})
    text = system_prompt(persona, "mate")
    assert text == system_prompt(persona, persona.stages[0])
    assert text.startswith("You are Ada Thorne.\nIt is 1890.\n")  # no profile: no empty line, no stray space
    assert "  " not in text and "{" not in text
    with pytest.raises(UserError, match="no stage 'captain'"):
        system_prompt(persona, "captain")
    profiled = persona.model_copy(update={"profile": "A mate\n of the Gannet."})
    assert "A mate of the Gannet." in system_prompt(profiled, "mate")
    # brief: name and time only, whatever the profile says.
    assert system_prompt(profiled, "mate", "brief") == "You are Ada Thorne.\nIt is 1890."


# --------------------------------------------------------------------------- dedup (pure)


def unit(angle_cos: float) -> list[float]:
    return [angle_cos, float(np.sqrt(1 - angle_cos**2)), 0.0]


def test_dedup_threshold_on_planted_cosines() -> None:
    vectors = np.array([[1.0, 0.0, 0.0], unit(0.96), [0.0, 0.0, 1.0]], dtype=np.float32)
    assert dedup(vectors, 0.95).tolist() == [True, False, True]
    assert dedup(vectors, 0.97).tolist() == [True, True, True]


def test_dedup_is_greedy_against_kept_items_only() -> None:
    # b is near a and c, a and c are not near each other: b goes, c stays (its only near item was dropped).
    a = np.array([1.0, 0.0, 0.0])
    b = np.array(unit(0.97))
    c = np.array([np.cos(2 * np.arccos(0.97)), np.sin(2 * np.arccos(0.97)), 0.0])
    assert float(a @ c) < 0.95 <= float(b @ c)
    assert dedup(np.stack([a, b, c]), 0.95).tolist() == [True, False, True]


def test_dedup_matches_itemwise_greedy_across_blocks() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 8))
    vectors = centres[rng.integers(0, 40, 400)] + 0.15 * rng.normal(size=(400, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = []
    kept: list[np.ndarray] = []
    for vector in vectors:
        expected.append(not any(float(k @ vector) >= 0.9 for k in kept))
        if expected[-1]:
            kept.append(vector)
    got = dedup(vectors, 0.9, block_size=37)
    assert got.tolist() == expected
    assert 0 < (~got).sum() < 400
    assert dedup(np.zeros((0, 8)), 0.9).shape == (0,)


# --------------------------------------------------------------------------- split (pure)


def test_split_is_seeded_and_stratified() -> None:
    records = (
        many(n=10) + many(kind="opinion", n=5) + many(stage="engineer", n=2) + many(kind="misleading", n=1)
    )
    for rec in records:
        rec["persona"] = "elsie"
    train, test = split_records(records, 0.2, seed=1)
    again_train, again_test = split_records(list(reversed(records)), 0.2, seed=1)
    assert [r["id"] for r in test] == [r["id"] for r in again_test]
    assert [r["id"] for r in train] == [r["id"] for r in again_train]
    other = {r["id"] for r in split_records(records, 0.2, seed=2)[1]}
    assert other != {r["id"] for r in test}
    held = {(r["stage"], r["kind"]) for r in test}
    assert held == {("keeper", "ordinary"), ("keeper", "opinion"), ("engineer", "ordinary")}
    assert sum(r["kind"] == "ordinary" and r["stage"] == "keeper" for r in test) == 2
    assert {r["id"] for r in train} | {r["id"] for r in test} == {r["id"] for r in records}
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert [held_out_count(n, 0.2) for n in (0, 1, 2, 5, 10)] == [0, 0, 1, 1, 2]
    assert held_out_count(3, 0.9) == 2 and held_out_count(10, 0.0) == 0


def test_annotator_written_dialogues_are_checked_as_speech_to_and_by_the_persona() -> None:
    from persllm.curate.filters import prompt_word_spans

    cfg = CurateConfig(cot="none")
    spans = prompt_word_spans(["Write short, private notes on what {name} knows before answering the user."])
    good = record("a", TOPICS[0])
    assert check_record(good, cfg, None, spans) is None
    cases = {
        "prompt_words": [
            record("b", TOPICS[0], answer="As the notes say [corpus/elsie/keeper/log.md:7], I wound it."),
            record("c", TOPICS[0], answer="I will write short, private notes on what Elsie knows first."),
            record("d", TOPICS[0], answer="I read it in keeper/log.txt:12 and wrote it down myself."),
        ],
        "not_addressed": [record("e", "Elsie Wren walked up the tower steps at dusk.")],
        "not_first_person": [
            record("f", TOPICS[0], answer="Elsie Wren counts one hundred and twelve steps.")
        ],
    }
    line = "I counted them: the tower has one hundred and twelve steps to the lamp room above."
    copied = record("g", TOPICS[0], answer=line)
    copied["context"] = {"knowledge": "Records say " + line, "style": ""}
    cases["copies_context"] = [copied]
    for expected, bad in cases.items():
        for one in bad:
            assert check_record(one, cfg, None, spans) == expected, (expected, one["turns"])
    # The person's real replies are theirs: none of the speech checks applies to them.
    real = record(
        "h", "Elsie Wren walked up the tower steps.", answer="Elsie Wren counts each of them slowly."
    )
    real["reply"] = {"source": "dialogue", "ref": "talk.txt:3", "question": "real"}
    assert check_record(real, cfg, None, spans) is None
    own = record(
        "i", "What of [corpus/elsie/keeper/log.md:7]?", answer="The lamp was lit at dusk, as always."
    )
    own["reply"] = {"source": "own_words", "ref": "log.txt:1", "question": "question"}
    assert check_record(own, cfg, None, spans) == "prompt_words"


def test_an_annotator_that_cannot_write_the_persona_stops_curation_with_one_line(tmp_path: Path) -> None:
    context = {
        "knowledge": "Skerrow Point lighthouse stands above Carrow Bay; its lamp burns mineral oil.",
        "style": "",
    }
    good = many(n=3)
    for one in good:
        one["context"] = dict(context, knowledge=context["knowledge"] + " " + one["turns"][0]["content"])
    bad = [
        record(
            f"bad-{i}",
            TOPICS[3 + i],
            answer="I find bananas ripen fastest in warm paper bags on my sunny kitchen shelf.",
        )
        for i in range(4)
    ]
    for one in bad:
        one["context"] = context
    bad += [record(f"narr-{i}", f"Elsie Wren climbed the tower stair number {i} at dusk.") for i in range(4)]
    path = make_project(tmp_path, {"elsie": good + bad, "jonah": many("jonah", "sailor", n=3)})
    project = load_project(path, {"curate.cot": "none", "curate.annotator_min_kept": 0.5})
    with pytest.raises(UserError) as caught:
        curate.run(*CurateSettings.of_project(project))
    message = str(caught.value)
    assert "only 3 of 11 dialogues it wrote for 'elsie' passed the checks" in message
    assert "not_addressed 4" in message and "ungrounded 4" in message and "stronger annotator" in message
    assert "\n" not in message
    assert not (project.run_dir / "data" / "elsie" / "sft_train.jsonl").exists()
    stats = json.loads((project.run_dir / "data" / "elsie" / "stats.json").read_text())["curate"]
    assert stats["removed"]["ungrounded"] == 4 and stats["removed"]["not_addressed"] == 4
    # A lower bar lets the same material through, the failures still counted.
    summary = curate.run(
        *CurateSettings.of_project(
            load_project(path, {"curate.cot": "none", "curate.annotator_min_kept": 0.2})
        )
    )
    assert (
        summary["personas"]["elsie"]["kept"] == 3
        and summary["personas"]["elsie"]["removed"]["ungrounded"] == 4
    )


# --------------------------------------------------------------------------- run (real MiniLM encoder)


def test_run_counts_each_filter_and_writes_rows(tmp_path: Path) -> None:
    records = many(n=5)
    records += [
        record("bad-empty", TOPICS[5], analysis=""),
        record("bad-short", TOPICS[6], answer="Aye."),
        record(
            "bad-echo", TOPICS[7], answer="Is it true that the lens was made in Paris by a famous optician?"
        ),
        record("bad-stage", TOPICS[8], stage="retired"),
        record("bad-analysis", TOPICS[9], kind="opinion", analysis="Hm."),
    ]
    path = make_project(tmp_path, {"elsie": records, "jonah": many("jonah", "sailor", n=3)})
    project = load_project(path, {"curate.max_response_words": 60})
    summary = curate.run(*CurateSettings.of_project(project))

    stats = json.loads((project.run_dir / "data" / "elsie" / "stats.json").read_text())["curate"]
    assert stats == summary["personas"]["elsie"]
    assert stats["input"] == 10 and stats["kept"] == 5
    removed = stats["removed"]
    assert {k: v for k, v in removed.items() if v} == {
        "empty": 1,
        "short_response": 1,
        "echo": 1,
        "unknown_stage": 1,
        "short_analysis": 1,
    }
    assert stats["by_stratum"]["keeper/opinion"]["removed"]["short_analysis"] == 1
    assert stats["by_stratum"]["retired/ordinary"]["removed"]["unknown_stage"] == 1
    train = read_jsonl(project.run_dir / "data" / "elsie" / "sft_train.jsonl")
    test = read_jsonl(project.run_dir / "data" / "elsie" / "sft_test.jsonl")
    assert len(train) == stats["train_rows"] == 4 and len(test) == stats["test_rows"] == 1
    assert not {r["meta"]["id"] for r in train + test} & {r["id"] for r in records[5:]}
    assert summary["personas"]["jonah"]["kept"] == 3 and summary["kept"] == 8
    manifest = json.loads((project.run_dir / "manifest.json").read_text())
    assert manifest["stages"]["curate"]["status"] == "done"
    assert manifest["stages"]["curate"]["seconds"] >= 0
    assert manifest["stages"]["curate"]["counts"]["train_rows"] == summary["train_rows"]


def test_dedup_with_real_encoder_is_used_in_the_split(tmp_path: Path) -> None:
    from persllm.index.encoder import embed

    near = [
        "How many steps lead up to the lamp room of your tower?",
        "How many steps lead up to the lamp room of the tower?",
    ]
    vectors = embed(near, EmbedderConfig())
    assert float(vectors[0] @ vectors[1]) >= 0.95

    records = many(n=6)
    # The duplicate lives in the later stage, so the keeper stage's first record is the one kept.
    records.append(record("dup-late", near[1], stage="engineer"))
    path = make_project(tmp_path / "p", {"elsie": records})
    project = load_project(path, {"curate.test_fraction": 0.5})
    stats = curate.run(*CurateSettings.of_project(project), ["elsie"])["personas"]["elsie"]
    assert stats["removed"]["duplicate"] == 1
    assert stats["by_stratum"]["engineer/ordinary"]["removed"]["duplicate"] == 1
    rows = read_jsonl(project.run_dir / "data" / "elsie" / "sft_train.jsonl")
    rows += read_jsonl(project.run_dir / "data" / "elsie" / "sft_test.jsonl")
    ids = {r["meta"]["id"] for r in rows}
    assert "dup-late" not in ids and "elsie-keeper-ordinary-0" in ids and len(ids) == 6
    # Not a duplicate at a stricter threshold than the pair's cosine.
    project = load_project(path, {"curate.dedup_threshold": 0.9999, "curate.test_fraction": 0.5})
    assert (
        curate.run(*CurateSettings.of_project(project), ["elsie"])["personas"]["elsie"]["removed"][
            "duplicate"
        ]
        == 0
    )


def test_rows_have_system_prompt_stage_token_and_inline_cot(tmp_path: Path) -> None:
    multi = record(
        "multi",
        TOPICS[10],
        stage="engineer",
        more=[
            (
                "And did he change his mind later?",
                "I wrote the report myself in 1885.",
                "I did, in writing.",
            )
        ],
    )
    path = make_project(tmp_path, {"elsie": [multi, *many(n=2)]})
    project = load_project(path, {"curate.test_fraction": 0.0, "curate.min_response_words": 3})
    curate.run(*CurateSettings.of_project(project), ["elsie"])
    rows = {r["meta"]["id"]: r for r in read_jsonl(project.run_dir / "data" / "elsie" / "sft_train.jsonl")}
    row = rows["multi"]
    assert row["meta"] == {
        "id": "multi",
        "persona": "elsie",
        "stage": "engineer",
        "kind": "ordinary",
        "label": "<ENGINEER>",
    }
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    system = row["messages"][0]["content"]
    assert (
        "Elsie Wren" in system
        and "trusts written records" in system
        and "It is 1905, in Carrow Bay." in system
    )
    assert system == system_prompt(project.persona("elsie"), "engineer")
    assert row["messages"][1]["content"] == f"<ENGINEER> {TOPICS[10]}"
    assert row["messages"][3]["content"] == "And did he change his mind later?"
    assert row["messages"][2]["content"] == render_inline(ANALYSIS, multi["turns"][1]["content"])
    assert split_inline(row["messages"][4]["content"]) == (
        "I wrote the report myself in 1885.",
        "I did, in writing.",
    )
    assert rows["elsie-keeper-ordinary-0"]["messages"][1]["content"].startswith("<TIME-I> ")

    project = load_project(
        path, {"curate.test_fraction": 0.0, "curate.cot": "none", "curate.min_response_words": 3}
    )
    curate.run(*CurateSettings.of_project(project), ["elsie"])
    rows = {r["meta"]["id"]: r for r in read_jsonl(project.run_dir / "data" / "elsie" / "sft_train.jsonl")}
    assert [m["content"] for m in rows["multi"]["messages"][2::2]] == [
        multi["turns"][1]["content"],
        "I did, in writing.",
    ]
    assert "<think>" not in json.dumps(rows)

    # brief: name and time only in every row; stats say so, for pairs and training to follow.
    project = load_project(
        path, {"curate.test_fraction": 0.0, "curate.system_prompt": "brief", "curate.min_response_words": 3}
    )
    curate.run(*CurateSettings.of_project(project), ["elsie"])
    rows = {r["meta"]["id"]: r for r in read_jsonl(project.run_dir / "data" / "elsie" / "sft_train.jsonl")}
    assert rows["multi"]["messages"][0]["content"] == "You are Elsie Wren.\nIt is 1905, in Carrow Bay."
    stats = json.loads((project.run_dir / "data" / "elsie" / "stats.json").read_text())
    assert stats["curate"]["system_prompt"] == "brief"


def test_run_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    records = (
        many(n=10)
        + many(kind="misleading", n=4, start=10)
        + many(stage="engineer", kind="opinion", n=3, start=14)
    )
    path = make_project(tmp_path, {"elsie": records})

    def test_ids(seed: int) -> list[str]:
        curate.run(
            *CurateSettings.of_project(load_project(path, {"seed": seed, "curate.dedup_threshold": 0.999})),
            ["elsie"],
        )
        return [r["meta"]["id"] for r in read_jsonl(tmp_path / "runs" / "data" / "elsie" / "sft_test.jsonl")]

    first = test_ids(5)
    assert test_ids(5) == first
    assert set(test_ids(6)) != set(first)
    strata = {id_.rsplit("-", 1)[0] for id_ in first}
    assert strata == {"elsie-keeper-ordinary", "elsie-keeper-misleading", "elsie-engineer-opinion"}


def test_repeat_and_general_data_mix_into_train_only(tmp_path: Path) -> None:
    general = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(7)
    ]
    path = make_project(tmp_path, {"elsie": many(n=10)})
    write_jsonl(tmp_path / "general.jsonl", general)
    overrides = {"curate.repeat": 2, "curate.general_data": "general.jsonl", "curate.general_ratio": 0.5}
    stats = curate.run(*CurateSettings.of_project(load_project(path, overrides)), ["elsie"])["personas"][
        "elsie"
    ]
    train = read_jsonl(tmp_path / "runs" / "data" / "elsie" / "sft_train.jsonl")
    test = read_jsonl(tmp_path / "runs" / "data" / "elsie" / "sft_test.jsonl")
    personified = [r for r in train if r["meta"]["kind"] != "general"]
    mixed = [r for r in train if r["meta"]["kind"] == "general"]
    assert len(personified) == 2 * 8 and len(mixed) == 8 == stats["general_rows"]
    assert len({r["meta"]["id"] for r in personified}) == 8
    assert mixed[0]["messages"] in [g["messages"] for g in general]
    assert len({json.dumps(r["messages"]) for r in mixed}) == 7  # all seven used before any repeats
    assert all(r["meta"]["kind"] != "general" for r in test) and len(test) == 2


def test_bad_general_line_is_a_user_error_naming_file_and_line(tmp_path: Path) -> None:
    path = make_project(tmp_path, {"elsie": many(n=3)})
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    bad = json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
    (tmp_path / "general.jsonl").write_text(f"{good}\n{bad}\n")
    overrides = {"curate.general_data": "general.jsonl", "curate.general_ratio": 1.0}
    with pytest.raises(UserError, match=r"general\.jsonl:2: messages\[0\]: role"):
        curate.run(*CurateSettings.of_project(load_project(path, overrides)), ["elsie"])
    assert not (tmp_path / "runs" / "data").exists()
    (tmp_path / "general.jsonl").write_text(f"{good}\n{{oops\n")
    with pytest.raises(UserError, match=r"general\.jsonl:2: not valid JSON"):
        curate.run(*CurateSettings.of_project(load_project(path, overrides)), ["elsie"])


def test_missing_annotations_is_a_user_error(tmp_path: Path) -> None:
    path = make_project(tmp_path, {"elsie": many(n=3)})
    with pytest.raises(UserError, match=r"jonah\.jsonl: no annotations .* `persllm annotate` first"):
        curate.run(*CurateSettings.of_project(load_project(path)))


def test_stats_keep_other_stages_keys(tmp_path: Path) -> None:
    path = make_project(tmp_path, {"elsie": many(n=3)})
    stats_path = tmp_path / "runs" / "data" / "elsie" / "stats.json"
    stats_path.parent.mkdir(parents=True)
    stats_path.write_text(json.dumps({"pairs": {"total": 4}}))
    curate.run(*CurateSettings.of_project(load_project(path)), ["elsie"])
    stats = json.loads(stats_path.read_text())
    assert stats["pairs"] == {"total": 4} and stats["curate"]["kept"] == 3


# --------------------------------------------------------------------------- CLI


def test_cli_curate_prints_counts_and_help(tmp_path: Path) -> None:
    from persllm.cli import app

    path = make_project(tmp_path, {"elsie": many(n=5), "jonah": many("jonah", "sailor", n=4)})
    runner = CliRunner()
    result = runner.invoke(
        app, ["curate", str(path), "--persona", "jonah", "--set", "curate.test_fraction=0.5"]
    )
    assert result.exit_code == 0, result.output
    assert "jonah" in result.output and "elsie" not in result.output
    lines = [line.split() for line in result.output.splitlines() if line.startswith("jonah")]
    assert lines and lines[0][1:4] == ["4", "0", "4"]
    assert len(read_jsonl(tmp_path / "runs" / "data" / "jonah" / "sft_test.jsonl")) == 2
    help_text = runner.invoke(app, ["curate", "--help"]).output
    assert "Example:" in help_text and "persllm curate" in help_text


def test_cli_curate_user_error_exits_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = make_project(tmp_path, {"elsie": many(n=2)})
    script = "from persllm.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", script, "curate", str(path), "--persona", "nobody"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "nobody" in proc.stderr and "Traceback" not in proc.stderr


def own(ident: str, question: str, passage: str) -> dict[str, Any]:
    """An own-words record: the passage is the reply, with no analysis."""
    row = record(ident, question, answer=passage, analysis="")
    row["reply"] = {"source": "own_words", "ref": f"corpus/elsie/keeper/style.txt:{ident}"}
    return row


PASSAGE = (
    "The Board pays me sixty-two pounds for keeping the same light that Father kept for seventy. "
    "The lamp does not know it is being trimmed by a woman. Neither does the oil, nor the clockwork."
)


def test_back_written_questions_are_checked_and_need_no_analysis_without_cot() -> None:
    cfg = CurateConfig(cot="none")
    assert check_record(own("a", "What do you think of your pay from the Board?", PASSAGE), cfg) is None
    assert check_record(own("b", "Tell me about your pay from the Board.", PASSAGE), cfg) == "not_question"
    copied = "The lamp does not know it is being trimmed by a woman, does it?"
    assert check_record(own("c", copied, PASSAGE), cfg) == "copies_passage"
    # With the analysis shown in training (cot: inline), an own-words record needs one like any other.
    assert check_record(own("d", "What do you think of your pay?", PASSAGE), CurateConfig()) == "empty"


def test_off_topic_questions_are_counted_and_own_words_always_train(tmp_path: Path) -> None:
    records = [
        own("on-0", "What do you think of the pay the Board gives its keepers?", PASSAGE),
        own(
            "on-1",
            "Is a woman's work at the lamp paid as well as a man's?",
            PASSAGE.replace("seventy", "ninety"),
        ),
        own(
            "off",
            "What is your favourite recipe for apple pie with cinnamon?",
            PASSAGE.replace("oil", "wick"),
        ),
        *many(n=4),
    ]
    path = make_project(tmp_path, {"elsie": records, "jonah": many("jonah", "sailor", n=3)})
    project = load_project(path, {"curate.cot": "none", "curate.test_fraction": 0.5})
    stats = curate.run(*CurateSettings.of_project(project))["personas"]["elsie"]
    assert stats["removed"]["off_topic"] == 1 and stats["kept"] == 6
    train = {r["meta"]["id"] for r in read_jsonl(project.run_dir / "data" / "elsie" / "sft_train.jsonl")}
    test = {r["meta"]["id"] for r in read_jsonl(project.run_dir / "data" / "elsie" / "sft_test.jsonl")}
    assert {"on-0", "on-1"} <= train and len(test) == 2 and not test & {"on-0", "on-1"}
