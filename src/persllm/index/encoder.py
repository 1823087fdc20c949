"""The sentence encoder: loaded once per process and (model, device), batched, L2-normalised.

The reference code re-creates the encoder for every retrieval query; here every caller (index, retrieval,
curation dedup, evaluation) shares one instance. Several threads may encode with it at once (the
annotator's retrieval workers do): torch releases the GIL inside each operation, so on a CPU with
``n`` cores and ``t`` torch threads, ``n // t`` workers run side by side (``query_workers``). The
first encode of each instance runs alone: the fast tokenizer sets its padding and truncation then, and
a second thread borrowing it meanwhile would fail.
"""

import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from persllm.bundled import resolve_model
from persllm.config import EmbedderConfig
from persllm.errors import UserError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_ENCODERS: dict[tuple[str, str], "SentenceTransformer"] = {}
_LOCK = threading.Lock()
QUERY_CACHE_SIZE = 16384  # 384-d vectors: about 25 MB
_QUERY_VECTORS: "OrderedDict[tuple[str, str], np.ndarray]" = OrderedDict()
_QUERY_LOCK = threading.Lock()
_FIRST_LOCK = threading.Lock()
_SETTLED: set[int] = set()  # ids of encoders that finished a first encode
MAX_QUERY_WORKERS = 4


def get_encoder(cfg: EmbedderConfig) -> "SentenceTransformer":
    """The process-wide SentenceTransformer for ``cfg.model`` on ``cfg.device``, loading it on first use."""
    key = (cfg.model, cfg.device)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = _load(cfg)
        return _ENCODERS[key]


def _load(cfg: EmbedderConfig) -> "SentenceTransformer":
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    location = resolve_model(cfg.model)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(location, device=cfg.device)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"embedder.model: cannot load {cfg.model!r} on {cfg.device!r} ({first[:160]}); "
            "use 'bundled:minilm', a local sentence-transformers folder or a cached hub id"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def dimension(cfg: EmbedderConfig) -> int:
    encoder = get_encoder(cfg)
    size = encoder.get_sentence_embedding_dimension()
    if size is None:  # some models only know it after a first encode
        size = int(_encode(encoder, ["dimension"], cfg.batch_size).shape[1])
    return int(size)


def embed(texts: list[str], cfg: EmbedderConfig, progress: bool = False) -> np.ndarray:
    """Embeddings of ``texts`` as float32 ``[n, d]``, each row of unit length.

    Texts are encoded longest first in batches of ``cfg.batch_size`` (less padding per batch) and
    returned in the order given.
    """
    if not texts:
        return np.zeros((0, dimension(cfg)), dtype=np.float32)
    encoder = get_encoder(cfg)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.empty((len(texts), 0), dtype=np.float32)
    bar = _progress_bar(len(texts)) if progress else None
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start : start + cfg.batch_size]
        vectors = _encode(encoder, [texts[i] for i in batch], cfg.batch_size)
        if out.shape[1] == 0:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[batch] = vectors
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return out


def embed_queries(texts: list[str], cfg: EmbedderConfig) -> np.ndarray:
    """``embed`` with a process-wide LRU of the last ``QUERY_CACHE_SIZE`` texts.

    Retrieval queries repeat: a resumed or re-run annotation replays the same user inputs from the
    call cache, and evaluation retrieves for the same test inputs once per system.
    """
    if not texts:
        return np.zeros((0, dimension(cfg)), dtype=np.float32)
    keys = [(cfg.model, text) for text in texts]
    with _QUERY_LOCK:
        known = {key: _QUERY_VECTORS[key] for key in keys if key in _QUERY_VECTORS}
        for key in known:
            _QUERY_VECTORS.move_to_end(key)
    missing = list(dict.fromkeys(text for key, text in zip(keys, texts, strict=True) if key not in known))
    if missing:
        fresh = embed(missing, cfg)
        with _QUERY_LOCK:
            for text, vector in zip(missing, fresh, strict=True):
                known[(cfg.model, text)] = vector
                _QUERY_VECTORS[(cfg.model, text)] = vector
            while len(_QUERY_VECTORS) > QUERY_CACHE_SIZE:
                _QUERY_VECTORS.popitem(last=False)
    return np.stack([known[key] for key in keys])


def clear_query_cache() -> None:
    """Forget every cached query vector (benchmarks time the encoder, not the cache)."""
    with _QUERY_LOCK:
        _QUERY_VECTORS.clear()


def query_workers(cfg: EmbedderConfig) -> int:
    """How many threads should embed retrieval queries at once: one per ``torch`` thread group of cores.

    A GPU runs one batch at a time anyway (1); on the CPU, ``cores // torch threads`` (at most
    ``MAX_QUERY_WORKERS``), so parallel batches share the cores instead of oversubscribing them.
    """
    if cfg.device != "cpu":
        return 1
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_QUERY_WORKERS, cores // max(1, torch.get_num_threads())))


def _encode(encoder: "SentenceTransformer", texts: list[str], batch_size: int) -> np.ndarray:
    if id(encoder) in _SETTLED:
        raw = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    else:
        with _FIRST_LOCK:  # see the module docstring
            raw = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
            _SETTLED.add(id(encoder))
    vectors = np.asarray(raw, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chunk", desc="embedding")
