"""Budgeted, seed-first retrieval from a persona stage's index (PersLLM's knowledge and style contexts).

For a query, each kind of material (knowledge, style) fills its own context up to a word budget
(``retrieval.knowledge_words`` / ``retrieval.style_words``):

1. the seed chunk, when given, comes first in the context of its own kind and is always included
   (the dialogue is about it), counting against that budget;
2. then chunks in descending cosine similarity to the query; a chunk that would overflow the budget is
   skipped and smaller, less similar chunks may still fill the rest; no chunk (or identical text) twice.

A stage sees only its own material, unless it has ``inherits: true``: then it also sees every earlier
stage's. Each stage's index is read once per Retriever, the encoder once per process; scoring is one
matrix-vector product per kind. A Retriever may be used from several threads at once (the annotator's
retrieval workers): loading is locked, retrieval itself only reads.
"""

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from persllm.config import EmbedderConfig, Project, Workspace
from persllm.config.project import RetrievalConfig
from persllm.errors import UserError
from persllm.hashing import stable_hash
from persllm.index import encoder
from persllm.jsonl import read_jsonl
from persllm.persona.corpus import KINDS, Chunk


@dataclass
class Piece:
    """One retrieved chunk: its text, its ``file:line`` reference and its cosine similarity to the query."""

    text: str
    ref: str
    score: float
    id: str = ""
    stage: str = ""

    @property
    def words(self) -> int:
        return len(self.text.split())


@dataclass
class Context:
    """The knowledge and style contexts retrieved for one query."""

    persona: str
    stage: str
    query: str
    knowledge: list[Piece] = field(default_factory=list)
    style: list[Piece] = field(default_factory=list)
    seed: str | None = None

    def knowledge_text(self, sources: bool = True) -> str:
        return render(self.knowledge, sources)

    def style_text(self, sources: bool = True) -> str:
        return render(self.style, sources)

    def to_dict(self) -> dict[str, Any]:
        return {
            "persona": self.persona,
            "stage": self.stage,
            "query": self.query,
            "seed": self.seed,
            "knowledge": [asdict(piece) for piece in self.knowledge],
            "style": [asdict(piece) for piece in self.style],
            "knowledge_words": sum(piece.words for piece in self.knowledge),
            "style_words": sum(piece.words for piece in self.style),
        }


def render(pieces: list[Piece], sources: bool = True) -> str:
    """Pieces as ``[ref] text`` blocks separated by blank lines (``text`` alone without ``sources``)."""
    return "\n\n".join(f"[{piece.ref}] {piece.text}" if sources else piece.text for piece in pieces)


def without_sources(text: str) -> str:
    """Rendered pieces (a stored annotation context) without their ``[ref]`` markers: what a persona
    model is shown, as ``render(pieces, sources=False)`` gives it from the pieces. The annotator
    sees the sources; a model answering in character does not need file paths (in a corpus read from
    another folder they are a third of the context's tokens) and should not learn to cite them."""
    return "\n\n".join(re.sub(r"^\[[^\]\n]*\] ", "", block) for block in text.split("\n\n"))


@dataclass
class Pool:
    """The material one stage may retrieve from, for one kind: chunks, their unit vectors, word counts."""

    chunks: list[Chunk]
    matrix: np.ndarray
    words: np.ndarray
    positions: dict[str, int] = field(default_factory=dict)


class Retriever:
    """Retrieval over a project's index; stage indexes load lazily, once each."""

    def __init__(self, workspace: Workspace, embedder: EmbedderConfig, retrieval: RetrievalConfig) -> None:
        self.workspace = workspace
        self.embedder = embedder
        self.retrieval = retrieval
        self._stages: dict[tuple[str, str], tuple[list[Chunk], np.ndarray]] = {}
        self._pools: dict[tuple[str, str], dict[str, Pool]] = {}
        self._lock = threading.RLock()  # held while loading; pools() loads stages under it

    @classmethod
    def of(cls, project: Project) -> "Retriever":
        """The retriever of a loaded project (commands, chat); a stage builds it from its own settings."""
        return cls(project.workspace, project.config.embedder, project.config.retrieval)

    def chunks(self, persona: str, stage: str, kind: str | None = None) -> list[Chunk]:
        """The stage's own chunks (never inherited ones), optionally of one kind: the seed candidates."""
        own, _ = self._stage(persona, stage)
        return [chunk for chunk in own if kind is None or chunk.kind == kind]

    def retrieve(self, persona: str, stage: str, query: str, seed: Chunk | str | None = None) -> Context:
        """Fill the knowledge and style contexts for ``query`` (the seed's text when the query is empty)."""
        return self.retrieve_many(persona, stage, [query], [seed])[0]

    def retrieve_many(
        self, persona: str, stage: str, queries: list[str], seeds: Sequence[Chunk | str | None] | None = None
    ) -> list[Context]:
        """``retrieve`` for many queries of one stage, with a single encoder call for all of them."""
        pools = self.pools(persona, stage)
        seed_list = list(seeds) if seeds is not None else [None] * len(queries)
        if len(seed_list) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(seed_list)} seeds")
        chunks = [self._resolve_seed(persona, stage, s) if s is not None else None for s in seed_list]
        texts = [q.strip() or (c.text if c else "") for q, c in zip(queries, chunks, strict=True)]
        if not all(texts):
            raise UserError("retrieve: the query is empty and there is no seed; give a query text")
        # Seeds found in the index reuse their stored vector; others are embedded with the queries.
        outside = [c.text for c in chunks if c is not None and c.id not in pools[c.kind].positions]
        vectors = encoder.embed_queries(texts + outside, self.embedder)
        budgets = {
            "knowledge": self.retrieval.knowledge_words,
            "style": self.retrieval.style_words,
        }
        contexts = []
        extra = len(texts)
        for text, vector, chunk in zip(texts, vectors, chunks, strict=False):
            context = Context(persona=persona, stage=stage, query=text, seed=chunk.id if chunk else None)
            for kind in KINDS:
                first = None
                if chunk is not None and chunk.kind == kind:
                    pool = pools[kind]
                    if chunk.id in pool.positions:
                        seed_vector = pool.matrix[pool.positions[chunk.id]]
                    else:
                        seed_vector, extra = vectors[extra], extra + 1
                    first = piece_of(chunk, float(seed_vector @ vector))
                setattr(context, kind, fill(pools[kind], vector, budgets[kind], first))
            contexts.append(context)
        return contexts

    # ------------------------------------------------------------------ loading

    def _stage(self, persona: str, stage: str) -> tuple[list[Chunk], np.ndarray]:
        self.workspace.persona(persona).stage(stage)  # unknown names are user errors
        key = (persona, stage)
        with self._lock:
            if key not in self._stages:
                self._stages[key] = load_stage(self.workspace, self.embedder, persona, stage)
            return self._stages[key]

    def pools(self, persona: str, stage: str) -> dict[str, Pool]:
        """Per kind, what the stage retrieves from: its own material, plus earlier stages' if it inherits."""
        key = (persona, stage)
        pools = self._pools.get(key)
        if pools is not None:
            return pools
        with self._lock:  # two threads asking at once build it once
            if key not in self._pools:
                self._pools[key] = self._build_pools(persona, stage)
            return self._pools[key]

    def _build_pools(self, persona: str, stage: str) -> dict[str, Pool]:
        spec = self.workspace.persona(persona)
        index = spec.stage_index(stage)
        visible = [s.id for s in spec.stages[:index]] if spec.stages[index].inherits else []
        loaded = [self._stage(persona, s) for s in [*visible, stage]]
        pools: dict[str, Pool] = {}
        for kind in KINDS:
            rows = [[i for i, c in enumerate(stage_chunks) if c.kind == kind] for stage_chunks, _ in loaded]
            matrix = np.concatenate([m[index] for (_, m), index in zip(loaded, rows, strict=True)])
            chunks = [c for stage_chunks, _ in loaded for c in stage_chunks if c.kind == kind]
            words = np.array([c.words for c in chunks], dtype=np.int64)
            positions = {c.id: i for i, c in enumerate(chunks)}
            pools[kind] = Pool(chunks, np.ascontiguousarray(matrix, dtype=np.float32), words, positions)
        return pools

    def _resolve_seed(self, persona: str, stage: str, seed: Chunk | str) -> Chunk:
        if isinstance(seed, Chunk):
            return seed
        pools = self.pools(persona, stage)
        candidates = [c for kind in KINDS for c in pools[kind].chunks]
        own = [c for c in candidates if c.stage == stage]
        for chunk in [*own, *candidates]:
            if seed in (chunk.id, chunk.ref):
                return chunk
        raise UserError(
            f"seed {seed!r}: no chunk with that id or file:line ref in {persona}/{stage}; "
            "use a ref from `persllm retrieve ... --json` output or the stage's chunks.jsonl"
        )


def piece_of(chunk: Chunk, score: float) -> Piece:
    return Piece(text=chunk.text, ref=chunk.ref, score=round(score, 6), id=chunk.id, stage=chunk.stage)


def fill(pool: Pool, query: np.ndarray, budget: int, first: Piece | None = None) -> list[Piece]:
    """Pieces in similarity order within ``budget`` words, ``first`` (the seed) leading; see module doc."""
    pieces = [first] if first is not None else []
    used_ids = {first.id} if first is not None else set()
    used_texts = {first.text} if first is not None else set()
    total = first.words if first is not None else 0
    if len(pool.chunks) == 0:
        return pieces
    scores = pool.matrix @ query
    order = np.argsort(-scores, kind="stable")
    words = pool.words[order]
    position = 0
    while position < len(order):
        # Jump straight to the next chunk that still fits, instead of testing each in Python.
        fits = np.flatnonzero(words[position:] <= budget - total)
        if fits.size == 0:
            break
        position += int(fits[0])
        index = int(order[position])
        position += 1
        chunk = pool.chunks[index]
        if chunk.id in used_ids or chunk.text in used_texts:
            continue
        pieces.append(piece_of(chunk, float(scores[index])))
        used_ids.add(chunk.id)
        used_texts.add(chunk.text)
        total += chunk.words
    return pieces


def load_heldout(workspace: Workspace, persona: str, stage: str) -> list[Chunk]:
    """The stage's held-out own words (``heldout.jsonl`` beside its index): evaluation references only."""
    workspace.persona(persona).stage(stage)
    return [Chunk.from_dict(row) for row in read_jsonl(workspace.layout.heldout_chunks(persona, stage))]


def load_stage(
    workspace: Workspace, embedder: EmbedderConfig, persona: str, stage: str
) -> tuple[list[Chunk], np.ndarray]:
    """A stage's chunks and embeddings, checked against each other and the configured embedder."""
    layout = workspace.layout
    folder = layout.index_stage(persona, stage)
    hint = f"run `persllm index {workspace.config_path}`"
    meta_path = layout.index_meta(persona, stage)
    if not meta_path.exists():
        raise UserError(f"{folder}: no index for {persona}/{stage}; {hint} first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    model = embedder.model
    if meta.get("model") != model:
        raise UserError(
            f"{folder}: index built with embedder {meta.get('model')!r} "
            f"but embedder.model is {model!r}; {hint}"
        )
    chunks = [Chunk.from_dict(row) for row in read_jsonl(layout.chunks(persona, stage), strict=True)]
    matrix = np.load(layout.embeddings(persona, stage), allow_pickle=False).astype(np.float32, copy=False)
    fingerprint = stable_hash([chunk.id for chunk in chunks])
    if matrix.shape[0] != len(chunks) or meta.get("fingerprint") != fingerprint:
        raise UserError(f"{folder}: index files do not match each other (interrupted run?); {hint}")
    return chunks, matrix
