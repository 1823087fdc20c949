"""The held-out split of the person's own words, own-words dialogues, and the guarantee that no held-out
passage reaches a training file or a retrieved context (the bundled example, a scripted annotator)."""

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from persllm import annotate, curate, index, pairs
from persllm.config import load_project
from persllm.config.stages import AnnotateSettings, CurateSettings, IndexSettings, PairsSettings
from persllm.errors import UserError
from persllm.index.retrieve import Retriever, load_heldout
from persllm.jsonl import read_jsonl
from persllm.persona.corpus import Chunk, reply_cut
from persllm.persona.heldout import HoldoutRule, choose_heldout, nothing_held_out, split_stages
from tests.fake_openai import FakeOpenAI

pytestmark = pytest.mark.slow  # an annotated copy of the example: `make test-fast` skips it


def chunk(i: int, kind: str = "style", text: str | None = None, stage: str = "s") -> Chunk:
    body = text or f"Passage number {i} about the harbour and the lamp."
    return Chunk(f"id{i}{kind}{stage}", "p", stage, kind, body, f"corpus/{stage}.txt:{i}", len(body.split()))


RULE = HoldoutRule(share=0.2, minimum=2, maximum=None, min_train=3)


def test_the_split_is_seeded_sized_and_independent_of_order() -> None:
    chunks = [chunk(i) for i in range(20)] + [chunk(i, "knowledge") for i in range(5)]
    held = choose_heldout(chunks, RULE, seed=1, where="p/s")
    assert len(held) == 4 and all(c.kind == "style" for c in held)
    assert choose_heldout(list(reversed(chunks)), RULE, seed=1, where="p/s") == held
    assert choose_heldout(chunks, RULE, seed=2, where="p/s") != held
    assert RULE.count(5) == 2  # at least min_passages
    assert HoldoutRule(0.5, 1, 3, 1).count(20) == 3  # at most max_passages
    assert HoldoutRule(0.0, 2, None, 3).count(20) == 0


def test_too_few_passages_warn_or_fail_naming_persona_stage_and_minimum(caplog: Any) -> None:
    few = [chunk(i) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="persllm"):
        assert choose_heldout(few, RULE, seed=1, where="persona 'p', stage 's'") == []
    assert (
        "persona 'p', stage 's': 4 style passages are too few" in caplog.text and "at least 5" in caplog.text
    )
    strict = HoldoutRule(0.2, 2, None, 3, strict=True)
    with pytest.raises(UserError, match=r"persona 'p', stage 's': 4 style passages .* \(at least 5 "):
        choose_heldout(few, strict, seed=1, where="persona 'p', stage 's'")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="persllm"):
        assert choose_heldout([chunk(0, "knowledge")], RULE, seed=1, where="p/s") == []
        nothing_held_out("p/s", RULE)
    assert "p/s: no style passages (the person's own words) and no real exchanges" in caplog.text
    with pytest.raises(
        UserError, match=r"p/s: no style passages .*; add style or dialogue files, or set holdout"
    ):
        nothing_held_out("p/s", strict)


def test_held_out_texts_leave_every_stage_and_kind() -> None:
    shared = "The same speech, used as knowledge and as style, and quoted in a later stage too."
    early = [chunk(i) for i in range(9)] + [chunk(99, "style", shared), chunk(98, "knowledge", shared)]
    late = [chunk(i, stage="t") for i in range(9)] + [chunk(97, "knowledge", shared, stage="t")]
    for seed in range(40):  # find a seed that holds the shared passage out
        kept, held = split_stages([("p", "s", early), ("p", "t", late)], RULE, seed)
        if any(c.text == shared for c in held[("p", "s")]):
            break
    else:
        pytest.fail("no seed held out the shared passage")
    assert all(c.text != shared for _, _, chunks in kept for c in chunks)
    texts = {c.text for held_chunks in held.values() for c in held_chunks}
    assert not texts & {c.text for _, _, chunks in kept for c in chunks}


def test_a_passage_printed_twice_or_quoted_leaves_the_index_with_it() -> None:
    speech = (
        "They must blow out the moral lights around us, and extinguish that greatest torch of all--pointing "
        "the way to their rights, their liberties, and their happiness."
    )
    reprint = speech.replace("--", "---").replace("They must", "they must")
    quoted = "As I said at Springfield: " + speech.split(",")[0] + ", and extinguish that greatest torch."
    other = "A passage about the harbour that shares no long run of words with the speech at all."
    early = [chunk(i) for i in range(9)] + [chunk(50, text=speech), chunk(51, text=reprint)]
    late = [chunk(i, stage="t") for i in range(9)] + [
        chunk(52, "knowledge", quoted, stage="t"),
        chunk(53, "knowledge", other, stage="t"),
    ]
    for seed in range(60):
        kept, held = split_stages([("p", "s", early), ("p", "t", late)], RULE, seed)
        if any(c.text in (speech, reprint) for c in held[("p", "s")]):
            break
    else:
        pytest.fail("no seed held out the speech")
    held_texts = [c.text for c in held[("p", "s")]]
    assert not {speech, reprint} <= set(held_texts)  # one copy held out, never both
    texts = {c.text for _, _, chunks in kept for c in chunks}
    assert speech not in texts and reprint not in texts and quoted not in texts
    assert other in texts


def test_reply_cut_keeps_whole_sentences() -> None:
    text = "The lamp is lit. The wind is north east and rising fast tonight. I logged it. Then I slept."
    assert reply_cut(text, 8) == "The lamp is lit."
    assert (
        reply_cut(text, 16) == "The lamp is lit. The wind is north east and rising fast tonight. I logged it."
    )
    assert reply_cut("one two three four five six", 3) == "one two three"


# --------------------------------------------------------------------------- the bundled example, end to end


def back_writer(body: dict[str, Any]) -> str:
    """A scripted annotator: a question for user-turn prompts, a delimited CoT reply for reply prompts."""
    prompt = body["messages"][-1]["content"]
    if "RESPONSE:" in prompt:
        return "ANALYSIS: The user is wrong about the date.\nRESPONSE: No, it was not so; I was there."
    if "said or wrote at this time, in their own words" not in prompt:
        return "The user asks a plain question and I answer it plainly."
    passage = prompt.split('"""')[1] if prompt.count('"""') >= 2 else prompt
    words = [w for w in passage.split() if w.isalpha() and len(w) > 5][:4]
    return f"Tell me, what of {' and '.join(words) or 'the harbour'}?"


def configure(config_path: Path, url: str) -> None:
    config = yaml.safe_load(config_path.read_text())
    config["annotator"] = {
        "backend": "openai",
        "model": "fake-model",
        "base_url": url,
        "structured_output": "off",
        "concurrency": 8,
        "max_retries": 1,
    }
    config["annotate"].update(
        {"counts": {"ordinary": 6, "misleading": 2, "opinion": 2}, "question_style": "question"}
    )
    # The scripted annotator's own dialogues echo their questions: keep going on the own-words ones.
    config["curate"] = {
        "cot": "none",
        "question_similarity_min": -1.0,
        "test_fraction": 0.5,
        "annotator_min_kept": 0.0,
    }
    config_path.write_text(yaml.safe_dump(config))


def without_dialogue(persona_path: Path) -> None:
    """Drop the dialogue material from a copied example persona file."""
    persona = yaml.safe_load(persona_path.read_text())
    for stage in persona["stages"]:
        stage.pop("dialogue", None)
    persona_path.write_text(yaml.safe_dump(persona, sort_keys=False))


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import shutil

    from tests.conftest import EXAMPLE

    root = tmp_path_factory.mktemp("heldout") / "demo"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("runs"))
    for persona in ("elsie", "jonah"):
        without_dialogue(root / "personas" / f"{persona}.yaml")  # this module: own words only
    with FakeOpenAI(default_reply=back_writer) as server:
        configure(root / "persllm.yaml", server.base_url)
        project = load_project(root / "persllm.yaml")
        index.run(*IndexSettings.of_project(project))
        annotate.run(*AnnotateSettings.of_project(project), progress=False)
        curate.run(*CurateSettings.of_project(project))
        pairs.run(*PairsSettings.of_project(project))
    return project


def heldout_texts(project: Any) -> dict[str, str]:
    return {
        c.text: f"{p}/{s.id}"
        for p, persona in project.personas.items()
        for s in persona.stages
        for c in load_heldout(project.workspace, p, s.id)
    }


def test_the_split_is_recorded_and_the_index_does_not_hold_it(annotated: Any) -> None:
    project = annotated
    held = heldout_texts(project)
    assert len(held) >= 4 * 2
    manifest = json.loads((project.run_dir / "manifest.json").read_text())
    split = manifest["stages"]["index"]["heldout"]
    assert sum(len(refs) for refs in split.values()) == len(held)
    assert all(set(entry) == {"id", "ref"} for refs in split.values() for entry in refs)
    for path in project.run_dir.glob("index/*/*/chunks.jsonl"):
        assert not {row["text"] for row in read_jsonl(path)} & set(held)


def test_no_held_out_text_reaches_training_data_or_retrieved_context(annotated: Any) -> None:
    project = annotated
    held = set(heldout_texts(project))
    references = {
        reply_cut(text, project.config.annotate.own_words_max_words) for text in held
    }  # what the evaluation compares with
    training = [
        *project.run_dir.glob("annotations/*.jsonl"),
        *project.run_dir.glob("data/*/*.jsonl"),
    ]
    assert len(training) >= 2 + 2 * 3
    for path in training:
        body = path.read_text(encoding="utf-8")
        leaked = [t for t in held | references if t in body]
        assert not leaked, f"{path} contains held-out text: {leaked[0][:60]}"
    retriever = Retriever.of(project)
    for record in read_jsonl(project.run_dir / "annotations" / "heldout" / "elsie.jsonl"):
        context = retriever.retrieve(record["persona"], record["stage"], record["turns"][0]["content"])
        pieces = [p.text for p in context.knowledge + context.style]
        assert pieces and not set(pieces) & held


def test_own_words_records_train_and_held_out_questions_stay_apart(annotated: Any) -> None:
    project = annotated
    records = read_jsonl(project.run_dir / "annotations" / "elsie.jsonl")
    own = [r for r in records if r["reply"]["source"] == "own_words"]
    # The example answers every ordinary and opinion dialogue in own words: 6 + 2 per stage.
    assert len(own) == 2 * 8 and {r["kind"] for r in own} == {"ordinary", "opinion"}
    for record in own:
        assert record["seed"]["source"] == "style" and record["reply"]["ref"] == record["seed"]["ref"]
        cut = project.config.annotate.own_words_max_words
        assert record["turns"][1]["content"] == reply_cut(record["seed"]["text"], cut)
        assert record["turns"][0]["content"].endswith("?")
    assert len({r["seed"]["ref"] for r in own}) == len(own)  # no passage answers twice
    assert all(r["reply"] == {"source": "annotator"} for r in records if r not in own)
    train_ids = {
        row["meta"]["id"] for row in read_jsonl(project.run_dir / "data" / "elsie" / "sft_train.jsonl")
    }
    test_ids = {
        row["meta"]["id"] for row in read_jsonl(project.run_dir / "data" / "elsie" / "sft_test.jsonl")
    }
    assert {r["id"] for r in own} <= train_ids and not {r["id"] for r in own} & test_ids
    questions = read_jsonl(project.run_dir / "annotations" / "heldout" / "elsie.jsonl")
    assert len(questions) == sum(
        len(load_heldout(project.workspace, "elsie", s.id)) for s in project.persona("elsie").stages
    )
    assert all(q["reply"]["source"] == "heldout" and q["turns"][1]["analysis"] == "" for q in questions)


def test_own_words_pairs_reject_the_same_persona_at_another_stage(annotated: Any) -> None:
    rows = read_jsonl(annotated.run_dir / "data" / "jonah" / "dpo_train.jsonl")
    stage_rows = [r for r in rows if r["meta"]["provenance"] == "cross_stage"]
    assert stage_rows
    for row in stage_rows:
        source = row["meta"]["rejected_from"]
        assert source["persona"] == "jonah" and source["stage"] != row["meta"]["stage"]


def test_a_stage_too_small_for_a_strict_split_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    import shutil

    from tests.conftest import EXAMPLE

    root = tmp_path / "demo"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("runs"))
    only = "Only this one passage of mine is left in the file, and it is long enough to count.\n"
    (root / "corpus" / "jonah" / "mayor" / "style.txt").write_text(only)
    persllm = Path(sys.executable).with_name("persllm")
    result = subprocess.run(
        [str(persllm), "index", str(root / "persllm.yaml")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "persona 'jonah', stage 'mayor': 1 style passages are too few" in message and "at least" in message
    assert not (root / "runs" / "demo" / "index").exists()
