"""The index stage with the real MiniLM encoder: files written, vectors right, the embedding cache."""

import json
from pathlib import Path

import numpy as np
import pytest

from persllm import index
from persllm.bundled import resolve_model
from persllm.config import EmbedderConfig, load_project
from persllm.config.stages import IndexSettings
from persllm.errors import UserError
from persllm.index import encoder
from persllm.index.retrieve import Retriever
from persllm.jsonl import read_jsonl
from persllm.manifest import load_manifest

SEA = [
    "The lighthouse lamp is lit at dusk and trimmed every four hours until dawn.",
    "Storms from the north-east drive the waves over the harbour wall in winter.",
    "The keeper records the barometer, the wind and every ship that passes in the log.",
]
RAIL = [
    "The new railway reached the town in 1871 and the first engine was named Comet.",
    "Coal trains leave the pit head at six and reach the docks by noon.",
]
LETTERS = ["Dear Maud, the fog came in again and I wound the clockwork twice before midnight."]


def write(path: Path, paragraphs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    write(tmp_path / "corpus" / "sea" / "facts.md", SEA)
    write(tmp_path / "corpus" / "sea" / "letters.txt", LETTERS)
    write(tmp_path / "corpus" / "rail" / "facts.md", RAIL)
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "kit.yaml").write_text(
        "id: kit\nname: Kit\nstages:\n"
        "  - {id: sea, time: It is 1868., knowledge: ['../corpus/sea/*.md'],\n"
        "     style: ['../corpus/sea/*.txt']}\n"
        "  - {id: rail, time: It is 1872., knowledge: ['../corpus/rail/*.md']}\n",
        encoding="utf-8",
    )
    (tmp_path / "personas" / "moss.yaml").write_text(
        "id: moss\nname: Moss\nstages:\n  - {id: only, time: Now., style: ['../corpus/rail/*.md']}\n",
        encoding="utf-8",
    )
    config = tmp_path / "persllm.yaml"
    config.write_text("project: idx\npersonas: ['personas/*.yaml']\n", encoding="utf-8")
    return config


def test_encoder_is_loaded_once_and_embeds_unit_float32_rows_in_order() -> None:
    cfg = EmbedderConfig()
    assert encoder.get_encoder(cfg) is encoder.get_encoder(EmbedderConfig(batch_size=2))
    texts = [SEA[0], "short", RAIL[1], LETTERS[0]]
    batched = encoder.embed(texts, EmbedderConfig(batch_size=2))
    assert batched.dtype == np.float32 and batched.shape == (4, 384)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([encoder.embed([text], cfg)[0] for text in texts])
    assert np.allclose(batched, one_by_one, atol=1e-4)
    # Related texts are closer than unrelated ones: the model is real, not noise.
    assert batched[0] @ batched[3] > batched[0] @ batched[2]
    assert encoder.embed([], cfg).shape == (0, 384)


def test_unloadable_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"embedder.model: cannot load .*no-model"):
        encoder.get_encoder(EmbedderConfig(model=str(tmp_path / "no-model")))


def test_run_writes_aligned_index_files_and_manifest(project: Path) -> None:
    loaded = load_project(project)
    result = index.run(*IndexSettings.of_project(loaded))
    assert result["chunks"] == 8 and result["embedded"] == 6 and result["reused"] == 2  # RAIL twice
    rows = {(row["persona"], row["stage"]): row for row in result["stages"]}
    assert rows["kit", "sea"] == {
        "persona": "kit", "stage": "sea", "chunks": 4, "knowledge": 3, "style": 1, "embedded": 4, "reused": 0,
        "heldout": 0, "exchanges": 0, "heldout_exchanges": 0,
    }  # fmt: skip
    # The same two RAIL paragraphs appear in two stages: embedded once, reused by the second stage.
    assert rows["kit", "rail"]["embedded"] + rows["moss", "only"]["embedded"] == 2
    folder = loaded.run_dir / "index" / "kit" / "sea"
    chunks = read_jsonl(folder / "chunks.jsonl")
    vectors = np.load(folder / "embeddings.npy")
    meta = json.loads((folder / "meta.json").read_text())
    assert [c["text"] for c in chunks] == [*SEA, *LETTERS]
    assert chunks[1]["ref"] == "corpus/sea/facts.md:3" and chunks[3]["kind"] == "style"
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.allclose(vectors, encoder.embed([*SEA, *LETTERS], EmbedderConfig()), atol=1e-4)
    assert meta["model"] == "bundled:minilm" and meta["chunks"] == 4 and meta["dimension"] == 384
    stage = load_manifest(loaded.run_dir)["stages"]["index"]
    assert stage["status"] == "done" and stage["chunks"] == 8 and stage["embedded"] == 6


def test_second_run_embeds_nothing_and_one_new_paragraph_embeds_one(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_project(project)
    index.run(*IndexSettings.of_project(loaded))
    folder = loaded.run_dir / "index" / "kit" / "sea"
    before = np.load(folder / "embeddings.npy")

    embedded: list[str] = []
    real_embed = encoder.embed

    def counting_embed(texts: list[str], cfg: EmbedderConfig, progress: bool = False) -> np.ndarray:
        embedded.extend(texts)
        return real_embed(texts, cfg, progress)

    monkeypatch.setattr(encoder, "embed", counting_embed)
    again = index.run(*IndexSettings.of_project(loaded))
    assert again["embedded"] == 0 and again["reused"] == 8 and embedded == []
    assert np.array_equal(np.load(folder / "embeddings.npy"), before)

    new = "A schooner ran aground on the Skerrow rocks and the crew were taken off by the lifeboat."
    write(project.parent / "corpus" / "sea" / "facts.md", [SEA[0], new, *SEA[1:]])
    third = index.run(*IndexSettings.of_project(load_project(project)))
    assert third["embedded"] == 1 and third["reused"] == 8 and embedded == [new]
    chunks = read_jsonl(folder / "chunks.jsonl")
    after = np.load(folder / "embeddings.npy")
    assert [c["text"] for c in chunks][:2] == [SEA[0], new]
    assert np.array_equal(after[0], before[0]) and np.array_equal(after[2], before[1])


def test_persona_filter_and_changed_model_reembeds(project: Path) -> None:
    loaded = load_project(project)
    only = index.run(*IndexSettings.of_project(loaded), personas=["moss"])
    assert [row["persona"] for row in only["stages"]] == ["moss"]
    assert not (loaded.run_dir / "index" / "kit").exists()
    with pytest.raises(UserError, match=r"no persona 'nobody'"):
        index.run(*IndexSettings.of_project(loaded), personas=["nobody"])

    # The same weights under another name are another cache key: everything is embedded again,
    # and an index built with one model refuses queries from another.
    other = load_project(project, {"embedder.model": resolve_model("bundled:minilm")})
    assert index.run(*IndexSettings.of_project(other), personas=["moss"])["embedded"] == 2
    with pytest.raises(
        UserError, match=r"index built with embedder .* but embedder.model is 'bundled:minilm'"
    ):
        Retriever.of(loaded).retrieve("moss", "only", "coal trains")


def test_corrupt_cache_is_rebuilt(project: Path) -> None:
    loaded = load_project(project)
    index.run(*IndexSettings.of_project(loaded))
    cache_files = list((loaded.run_dir / "index" / "embeddings_cache").glob("*.npz"))
    assert len(cache_files) == 1
    cache_files[0].write_bytes(b"not a zip file")
    assert index.run(*IndexSettings.of_project(loaded))["embedded"] == 6
    assert index.run(*IndexSettings.of_project(loaded))["embedded"] == 0


def test_corpus_errors_surface_before_writing(project: Path) -> None:
    (project.parent / "corpus" / "rail" / "bad.md").write_bytes(b"\xff\xfe broken")
    loaded = load_project(project)
    with pytest.raises(UserError, match=r"bad.md:1: not valid UTF-8"):
        index.run(*IndexSettings.of_project(loaded))
    assert not (loaded.run_dir / "index").exists()
