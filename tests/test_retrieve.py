"""Budgeted, seed-first retrieval with the real MiniLM encoder on a small three-stage project."""

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from persllm import index
from persllm.config import Project, load_project
from persllm.config.stages import IndexSettings
from persllm.errors import UserError
from persllm.index import encoder, retrieve
from persllm.index.retrieve import Context, Piece, Retriever

SHARED = "Kit always carried a brass pocket watch that her father gave her on her twelfth birthday."
CORPUS = {
    "early/facts.md": [
        "The lighthouse lamp burns paraffin and its wick is trimmed every four hours through the night.",
        "Winter storms from the north-east throw waves over the harbour wall and flood the fish quay.",
        "The keeper writes the barometer reading, the wind and every passing ship into the station log.",
        "In 1869 the schooner Mary Ellen was wrecked on the Skerrow rocks and four men were saved.",
        "When fog comes down the keeper rings the fog bell every thirty seconds until it lifts.",
        SHARED,
    ],
    "early/letters.txt": [
        "Dear Maud, the fog came in again tonight and I wound the clockwork twice before midnight.",
        "Dear Maud, please send more lamp cotton and a new pair of boots, the old ones let in the sea.",
        "To the Board: the lens is clean, the stores are counted and the light has not failed once.",
    ],
    "middle/facts.md": [
        "The railway reached Carrow Bay in 1871 and the first engine to arrive was named Comet.",
        "Coal trains leave the pit head at six in the morning and reach the docks before noon.",
        "The station master keeps the timetable and rings a hand bell before each departure.",
    ],
    "middle/speeches.txt": [
        "Friends, the iron road will carry our fish to the city while it is still fresh.",
        "I say the railway is a servant of the town, not its master.",
    ],
    "late/facts.md": [
        "In 1890 Kit was elected to the harbour board by a majority of eleven votes.",
        "The town council debated the new breakwater for three years before voting the money.",
        SHARED,
    ],
    "late/speeches.txt": [
        "Members of the board, a breakwater is cheaper than a funeral, and we have had too many funerals.",
    ],
}
PERSONA = """\
id: kit
name: Kit Wren
stages:
  - {id: early, time: It is 1869., knowledge: ['../corpus/early/*.md'], style: ['../corpus/early/*.txt']}
  - {id: middle, time: It is 1872., knowledge: ['../corpus/middle/*.md'], style: ['../corpus/middle/*.txt']}
  - id: late
    time: It is 1890.
    inherits: true
    knowledge: ['../corpus/late/*.md']
    style: ['../corpus/late/*.txt']
"""
LAMP = "How do you keep the lighthouse lamp burning at night?"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("retrieval")
    for name, paragraphs in CORPUS.items():
        path = root / "corpus" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    (root / "personas").mkdir()
    (root / "personas" / "kit.yaml").write_text(PERSONA, encoding="utf-8")
    path = root / "persllm.yaml"
    path.write_text("project: r\npersonas: [personas/kit.yaml]\n", encoding="utf-8")
    index.run(*IndexSettings.of_project(load_project(path)))
    return path


def project_with(config: Path, knowledge: int = 1500, style: int = 500) -> Project:
    return load_project(config, {"retrieval.knowledge_words": knowledge, "retrieval.style_words": style})


def expected_fill(
    project: Project, stage: str, kind: str, query: str, budget: int, exclude: str = ""
) -> list[str]:
    """The documented rule, computed independently: similarity order, skip what overflows, continue."""
    folder = project.run_dir / "index" / "kit" / stage
    rows = [json.loads(line) for line in (folder / "chunks.jsonl").read_text().splitlines()]
    vectors = np.load(folder / "embeddings.npy")
    query_vector = encoder.embed([query], project.config.embedder)[0]
    picked, total = [], 0
    for i in np.argsort(-(vectors @ query_vector), kind="stable"):
        row = rows[int(i)]
        if row["kind"] == kind and row["id"] != exclude and total + row["words"] <= budget:
            picked.append(row["id"])
            total += row["words"]
    return picked


def test_knowledge_fills_in_similarity_order_within_budget(config: Path) -> None:
    project = project_with(config, knowledge=40, style=20)
    context = Retriever.of(project).retrieve("kit", "early", LAMP)
    assert [p.id for p in context.knowledge] == expected_fill(project, "early", "knowledge", LAMP, 40)
    assert [p.id for p in context.style] == expected_fill(project, "early", "style", LAMP, 20)
    assert context.knowledge[0].text == CORPUS["early/facts.md"][0]
    assert context.knowledge[0].ref == "corpus/early/facts.md:1"
    assert sum(p.words for p in context.knowledge) <= 40 and len(context.knowledge) == 2
    scores = [p.score for p in context.knowledge]
    assert scores == sorted(scores, reverse=True)


def test_large_budget_takes_each_chunk_once(config: Path) -> None:
    context = Retriever.of(project_with(config)).retrieve("kit", "early", LAMP)
    assert sorted(p.text for p in context.knowledge) == sorted(CORPUS["early/facts.md"])
    assert sorted(p.text for p in context.style) == sorted(CORPUS["early/letters.txt"])


def test_seed_goes_first_in_its_own_kind_and_is_not_repeated(config: Path) -> None:
    project = project_with(config, knowledge=60, style=40)
    retriever = Retriever.of(project)
    plain = retriever.retrieve("kit", "early", LAMP)
    wreck = next(c for c in retriever.chunks("kit", "early", "knowledge") if "schooner" in c.text)
    assert wreck.id not in [p.id for p in plain.knowledge]  # least related to the lamp: not picked alone
    by_ref = retriever.retrieve("kit", "early", LAMP, seed=wreck.ref)
    assert by_ref.seed == wreck.id and by_ref.knowledge[0].id == wreck.id
    assert [p.id for p in by_ref.knowledge].count(wreck.id) == 1
    assert sum(p.words for p in by_ref.knowledge) <= 60
    assert by_ref.style == plain.style  # a knowledge seed leaves the style context alone
    for seed in (wreck.id, wreck):
        assert retriever.retrieve("kit", "early", LAMP, seed=seed).to_dict() == by_ref.to_dict()

    letter = retriever.chunks("kit", "early", "style")[1]
    styled = retriever.retrieve("kit", "early", LAMP, seed=letter)
    assert styled.style[0].id == letter.id and styled.knowledge == plain.knowledge
    # Remaining style pieces follow the rule with the seed's words already spent.
    rest = expected_fill(project, "early", "style", LAMP, 40 - letter.words, exclude=letter.id)
    assert [p.id for p in styled.style[1:]] == rest


def test_zero_budget_keeps_only_the_seed(config: Path) -> None:
    retriever = Retriever.of(project_with(config, knowledge=0, style=0))
    empty = retriever.retrieve("kit", "early", LAMP)
    assert empty.knowledge == [] and empty.style == []
    seed = retriever.chunks("kit", "early", "style")[0]
    seeded = retriever.retrieve("kit", "early", "", seed=seed.ref)
    assert [p.id for p in seeded.style] == [seed.id] and seeded.knowledge == []
    assert seeded.query == seed.text and seeded.style[0].score == pytest.approx(1.0, abs=1e-4)


def test_stages_see_only_their_own_material(config: Path) -> None:
    retriever = Retriever.of(project_with(config))
    middle = retriever.retrieve("kit", "middle", LAMP)
    assert {p.ref.split(":")[0] for p in middle.knowledge + middle.style} == {
        "corpus/middle/facts.md",
        "corpus/middle/speeches.txt",
    }
    early = retriever.retrieve("kit", "early", "Who was elected to the harbour board?")
    assert all(p.ref.startswith("corpus/early/") for p in early.knowledge + early.style)
    assert all(c.stage == "late" for c in retriever.chunks("kit", "late"))


def test_inheriting_stage_also_sees_earlier_stages_without_repeats(config: Path) -> None:
    retriever = Retriever.of(project_with(config, knowledge=45))
    late = retriever.retrieve("kit", "late", LAMP)
    assert late.knowledge[0].ref == "corpus/early/facts.md:1" and late.knowledge[0].stage == "early"
    everything = Retriever.of(project_with(config, knowledge=5000)).retrieve("kit", "late", "pocket watch")
    texts = [p.text for p in everything.knowledge]
    assert texts.count(SHARED) == 1 and texts[0] == SHARED
    expected = {*CORPUS["early/facts.md"], *CORPUS["middle/facts.md"], *CORPUS["late/facts.md"]}
    assert set(texts) == expected and len(texts) == len(expected)
    seed_from_earlier = retriever.retrieve(
        "kit", "late", "the breakwater vote", seed="corpus/middle/facts.md:1"
    )
    assert seed_from_earlier.knowledge[0].text == CORPUS["middle/facts.md"][0]


def test_each_stage_index_is_loaded_once(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = retrieve.load_stage

    def counting(workspace: Any, embedder: Any, persona: str, stage: str) -> tuple[list, np.ndarray]:
        calls.append(stage)
        return real(workspace, embedder, persona, stage)

    monkeypatch.setattr(retrieve, "load_stage", counting)
    retriever = Retriever.of(project_with(config))
    for query in (LAMP, "railway", "harbour board"):
        retriever.retrieve("kit", "late", query)
    retriever.chunks("kit", "early")
    assert sorted(calls) == ["early", "late", "middle"]


def test_rendering_and_json(config: Path) -> None:
    context = Retriever.of(project_with(config, knowledge=40, style=30)).retrieve("kit", "early", LAMP)
    assert context.knowledge_text() == "\n\n".join(f"[{p.ref}] {p.text}" for p in context.knowledge)
    assert context.style_text().startswith(f"[{context.style[0].ref}] ")
    data = json.loads(json.dumps(context.to_dict()))
    assert data["knowledge_words"] == sum(p.words for p in context.knowledge)
    assert data["knowledge"][0]["ref"] == context.knowledge[0].ref
    assert Context("p", "s", "q", [Piece("a b", "f:1", 0.5)]).knowledge_text() == "[f:1] a b"


def test_user_errors(config: Path, tmp_path: Path) -> None:
    retriever = Retriever.of(project_with(config))
    with pytest.raises(UserError, match=r"no stage 'nope'"):
        retriever.retrieve("kit", "nope", LAMP)
    with pytest.raises(UserError, match=r"no persona 'bob'"):
        retriever.retrieve("bob", "early", LAMP)
    with pytest.raises(UserError, match=r"seed 'corpus/early/facts.md:99': no chunk"):
        retriever.retrieve("kit", "early", LAMP, seed="corpus/early/facts.md:99")
    with pytest.raises(UserError, match=r"seed 'corpus/late/facts.md:1': no chunk .* kit/early"):
        retriever.retrieve("kit", "early", LAMP, seed="corpus/late/facts.md:1")
    with pytest.raises(UserError, match=r"query is empty"):
        retriever.retrieve("kit", "early", "  ")
    unindexed = load_project(config, {"run_dir": str(tmp_path / "elsewhere")})
    with pytest.raises(UserError, match=r"no index for kit/early; run `persllm index .*persllm.yaml` first"):
        Retriever.of(unindexed).retrieve("kit", "early", LAMP)


def test_retrieve_many_matches_retrieve_with_one_encoder_call(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    retriever = Retriever.of(project_with(config, knowledge=40, style=30))
    letter = retriever.chunks("kit", "early", "style")[2]
    outsider = retriever.chunks("kit", "middle", "knowledge")[0]  # not visible from early: embedded
    queries = [LAMP, "storms and waves over the harbour wall", "", "trains"]
    seeds: list = [None, "corpus/early/facts.md:3", letter, outsider]
    one_by_one = [retriever.retrieve("kit", "early", q, seed=s) for q, s in zip(queries, seeds, strict=True)]
    calls: list[int] = []
    real = encoder.embed

    def counting(texts: list[str], cfg: object, progress: bool = False) -> np.ndarray:
        calls.append(len(texts))
        return real(texts, cfg, progress)  # type: ignore[arg-type]

    monkeypatch.setattr(encoder, "embed", counting)
    monkeypatch.setattr(encoder, "_QUERY_VECTORS", type(encoder._QUERY_VECTORS)())
    together = retriever.retrieve_many("kit", "early", queries, seeds)
    assert calls == [5]  # four queries plus the one seed that is not in the stage's index
    again = Retriever.of(project_with(config, knowledge=40, style=30)).retrieve_many(
        "kit", "early", queries, seeds
    )
    assert calls == [5]  # every query vector came from the process-wide query cache
    assert [c.knowledge for c in again] == [c.knowledge for c in together]
    for single, batched in zip(one_by_one, together, strict=True):
        assert [p.id for p in batched.knowledge] == [p.id for p in single.knowledge]
        assert [p.id for p in batched.style] == [p.id for p in single.style]
        assert batched.seed == single.seed and batched.query == single.query
    assert together[2].query == letter.text and together[3].knowledge[0].id == outsider.id
    with pytest.raises(ValueError, match="2 queries but 1 seeds"):
        retriever.retrieve_many("kit", "early", ["a", "b"], [None])


def test_query_cache_matches_encoder_and_stays_bounded(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = project_with(config).config.embedder
    monkeypatch.setattr(encoder, "_QUERY_VECTORS", type(encoder._QUERY_VECTORS)())
    monkeypatch.setattr(encoder, "QUERY_CACHE_SIZE", 2)
    texts = [LAMP, "railway", LAMP]
    cached = encoder.embed_queries(texts, cfg)
    np.testing.assert_allclose(cached, encoder.embed(texts, cfg), atol=1e-5)
    encoder.embed_queries(["harbour board"], cfg)
    assert [text for _, text in encoder._QUERY_VECTORS] == ["railway", "harbour board"]  # LAMP evicted
    assert encoder.embed_queries([], cfg).shape == (0, cached.shape[1])


def test_threads_retrieving_at_once_load_once_and_match_one_by_one(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The annotator's retrieval workers share one Retriever and one encoder."""
    calls: list[str] = []
    real = retrieve.load_stage
    arrived = threading.Barrier(6)

    def slow(workspace: Any, embedder: Any, persona: str, stage: str) -> tuple[list, np.ndarray]:
        calls.append(stage)
        time.sleep(0.05)  # a wide window for a second thread to load the same stage too
        return real(workspace, embedder, persona, stage)

    monkeypatch.setattr(retrieve, "load_stage", slow)
    monkeypatch.setattr(encoder, "_QUERY_VECTORS", type(encoder._QUERY_VECTORS)())
    monkeypatch.setattr(encoder, "_SETTLED", set())  # the encoder's first encode happens in the threads
    project = project_with(config, knowledge=60, style=40)
    retriever = Retriever.of(project)
    queries = [LAMP, "railway", "harbour board", "fog bell", "wrecked schooner", "breakwater money"]
    results: dict[int, list[Context]] = {}

    def work(turn: int) -> None:
        arrived.wait(timeout=30)
        mine = queries[turn:] + queries[:turn]
        results[turn] = retriever.retrieve_many("kit", "late", mine)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 6
    assert sorted(calls) == ["early", "late", "middle"]  # each stage loaded by one thread only
    alone = {q: Retriever.of(project).retrieve("kit", "late", q).to_dict() for q in queries}
    for turn, contexts in results.items():
        mine = queries[turn:] + queries[:turn]
        assert [context.to_dict() for context in contexts] == [alone[q] for q in mine]
