"""``persllm index``: chunk every persona stage's corpus, embed what is new, write one index per stage.

Layout under ``<run_dir>/index/``::

    <persona>/<stage>/chunks.jsonl     one Chunk per line, in corpus order
    <persona>/<stage>/embeddings.npy   float32 [n, d], row i embeds line i of chunks.jsonl
    <persona>/<stage>/meta.json        model, dimension, counts, fingerprint (written last)
    <persona>/<stage>/exchanges.jsonl  the stage's real exchanges (dialogue material) that train
    <persona>/<stage>/heldout_exchanges.jsonl  those set aside, whole, for evaluation
    embeddings_cache/<model>.npz       text hash -> vector for one embedder model

The cache is keyed by the chunk text and the embedder model, not by persona or stage, so an unchanged
corpus embeds nothing, an edited one embeds only its new paragraphs, and moving a file to another
stage costs nothing.
"""

import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from persllm.config import EmbedderConfig, Workspace
from persllm.config.project import HoldoutConfig
from persllm.config.stages import IndexSettings
from persllm.errors import UserError
from persllm.hashing import stable_hash
from persllm.index import encoder
from persllm.jsonl import write_jsonl
from persllm.layout import RunLayout, write_atomic, write_json_atomic
from persllm.manifest import record_stage
from persllm.persona.corpus import Chunk, read_stage_chunks
from persllm.persona.dialogue import Exchange, read_persona_exchanges
from persllm.persona.heldout import HoldoutRule, nothing_held_out, split_exchanges, split_stages


def run(
    settings: IndexSettings,
    workspace: Workspace,
    personas: list[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the index of ``personas`` (default: all) and return per-stage and total counts."""
    started = time.perf_counter()
    cfg = settings.embedder
    persona_ids = personas or list(workspace.personas)
    layout = workspace.layout

    # Chunk every stage's corpus (user errors in the corpus surface here, before any model loads), then
    # set the held-out own words aside: the index never sees them.
    stages: list[tuple[str, str, list[Chunk]]] = []
    for persona_id in persona_ids:
        for stage in workspace.persona(persona_id).stages:
            chunks = read_stage_chunks(workspace, settings.corpus, persona_id, stage.id)
            stages.append((persona_id, stage.id, chunks))
    rule = holdout_rule(settings.holdout)
    stages, heldout = split_stages(stages, rule, settings.seed)
    talks = {
        (persona_id, stage_id): found
        for persona_id in persona_ids
        for stage_id, found in read_persona_exchanges(workspace, settings.corpus, persona_id).items()
    }
    check_material(workspace, stages, talks)
    talks_held = {
        key: split_exchanges(found, rule, settings.seed, f"{key[0]}/{key[1]}") for key, found in talks.items()
    }
    for persona_id, stage_id, chunks in stages:
        has_style = any(c.kind == "style" for c in chunks) or heldout[(persona_id, stage_id)]
        if not has_style and not talks.get((persona_id, stage_id)):
            nothing_held_out(f"persona {persona_id!r}, stage {stage_id!r}", rule)

    # Embed only texts the cache has not seen for this model.
    cache_path = layout.embedding_cache(model_key(cfg))
    cache = load_cache(cache_path)
    needed = {text_key(chunk.text): chunk.text for _, _, chunks in stages for chunk in chunks}
    missing = [key for key in needed if key not in cache]
    fresh = set(missing)
    if missing:
        vectors = encoder.embed([needed[key] for key in missing], cfg, progress=progress)
        cache.update(zip(missing, vectors, strict=True))
    dim = next(iter(cache.values())).shape[0] if cache else encoder.dimension(cfg)

    # Write each stage's arrays, then the cache (pruned to what a full run still uses).
    rows: list[dict[str, Any]] = []
    for persona_id, stage_id, chunks in stages:
        keys = [text_key(chunk.text) for chunk in chunks]
        matrix = np.stack([cache[key] for key in keys]) if keys else np.zeros((0, dim), np.float32)
        write_stage(layout, persona_id, stage_id, chunks, matrix.astype(np.float32), cfg)
        held = heldout[(persona_id, stage_id)]
        write_jsonl(layout.heldout_chunks(persona_id, stage_id), (c.to_dict() for c in held))
        train_talk, held_talk = talks_held[(persona_id, stage_id)]
        for path, found in (
            (layout.exchanges(persona_id, stage_id), train_talk),
            (layout.heldout_exchanges(persona_id, stage_id), held_talk),
        ):
            if found or path.exists():
                write_jsonl(path, (exchange.to_dict() for exchange in found))
        # A new text shared by several stages counts as embedded once, in the first stage using it.
        new_here = {key for key in keys if key in fresh}
        fresh -= new_here
        embedded = len(new_here)
        rows.append(
            {
                "persona": persona_id,
                "stage": stage_id,
                "chunks": len(chunks),
                "knowledge": sum(chunk.kind == "knowledge" for chunk in chunks),
                "style": sum(chunk.kind == "style" for chunk in chunks),
                "embedded": embedded,
                "reused": len(chunks) - embedded,
                "heldout": len(heldout[(persona_id, stage_id)]),
                "exchanges": len(train_talk),
                "heldout_exchanges": len(held_talk),
            }
        )
    if personas is None:
        cache = {key: cache[key] for key in needed}
    if missing or personas is None:
        save_cache(cache_path, cache)

    # Record the stage in the manifest.
    result = {
        "stages": rows,
        "chunks": sum(row["chunks"] for row in rows),
        "embedded": len(missing),
        "reused": sum(row["chunks"] for row in rows) - sum(row["embedded"] for row in rows),
        "heldout": sum(len(held) for held in heldout.values()),
        "exchanges": sum(row["exchanges"] for row in rows),
        "heldout_exchanges": sum(row["heldout_exchanges"] for row in rows),
        "model": cfg.model,
        "dimension": int(dim),
        "seconds": round(time.perf_counter() - started, 3),
    }
    split = {f"{p}/{s}": [{"id": c.id, "ref": c.ref} for c in held] for (p, s), held in heldout.items()}
    split_talk = {f"{p}/{s}": [e.ref for e in held] for (p, s), (_, held) in talks_held.items() if held}
    record_stage(
        workspace,
        "index",
        status="done",
        personas=persona_ids,
        chunks=result["chunks"],
        embedded=result["embedded"],
        reused=result["reused"],
        seconds=result["seconds"],
        heldout=split,
        heldout_exchanges=split_talk,
    )
    return result


def check_material(
    workspace: Workspace,
    stages: list[tuple[str, str, list[Chunk]]],
    talks: dict[tuple[str, str], list[Exchange]],
) -> None:
    """Every stage needs some text or some real exchange once the dated chats are spread over the stages."""
    for persona_id, stage_id, chunks in stages:
        if not chunks and not talks.get((persona_id, stage_id)):
            raise UserError(
                f"{workspace.persona_paths[persona_id]}: stage {stage_id!r}: no text and no exchange of "
                f"{workspace.persona(persona_id).name} falls in it; add material or widen its dates"
            )


def holdout_rule(cfg: HoldoutConfig) -> HoldoutRule:
    return HoldoutRule(
        cfg.share, cfg.min_passages, cfg.max_passages, cfg.min_train, cfg.strict, cfg.min_words
    )


def model_key(cfg: EmbedderConfig) -> str:
    return stable_hash({"embedder": cfg.model}, length=12)


def text_key(text: str) -> str:
    return stable_hash(text, length=24)


def load_cache(path: Path) -> dict[str, np.ndarray]:
    """The cached vectors of one model; an unreadable cache file is only a cache, so it reads as empty."""
    if not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, vectors = data["keys"], data["vectors"]
    except (OSError, ValueError, KeyError):
        return {}
    return {str(key): vectors[i] for i, key in enumerate(keys)}


def save_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = np.array(list(cache), dtype=str)
    vectors = np.stack(list(cache.values())).astype(np.float32) if cache else np.zeros((0, 0), np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, keys=keys, vectors=vectors)
    write_atomic(path, buffer.getvalue())


def write_stage(
    layout: RunLayout, persona: str, stage: str, chunks: list[Chunk], matrix: np.ndarray, cfg: EmbedderConfig
) -> None:
    """Write one stage's index; meta.json goes last and carries the fingerprint the reader checks."""
    write_jsonl(layout.chunks(persona, stage), (chunk.to_dict() for chunk in chunks))
    buffer = io.BytesIO()
    np.save(buffer, matrix)
    write_atomic(layout.embeddings(persona, stage), buffer.getvalue())
    meta = {
        "model": cfg.model,
        "dimension": int(matrix.shape[1]),
        "chunks": len(chunks),
        "knowledge": sum(chunk.kind == "knowledge" for chunk in chunks),
        "style": sum(chunk.kind == "style" for chunk in chunks),
        "fingerprint": stable_hash([chunk.id for chunk in chunks]),
    }
    write_json_atomic(layout.index_meta(persona, stage), meta)
