"""Near-duplicate removal by embedding cosine, exact and in bounded memory.

The result is the greedy one: walking the items in order, an item is dropped when an item kept before
it has cosine >= threshold with it, so the first item of every duplicate group survives. Walking item by
item against a growing array is quadratic in Python calls and re-copies the array each time; here each
block of items is compared with everything kept so far by one matrix product per chunk of kept rows,
and the only per-item work left is inside a block, for the few items that have a near neighbour there.
"""

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

# A float32 cosine of two unit vectors is off by up to a few 1e-7 (a word-for-word repeat can come out as
# 1.0000001): every bound on a cosine is compared with this much slack, so 1.0 means "identical".
COSINE_TOLERANCE = 1e-5


def dedup(embeddings: npt.ArrayLike, threshold: float, block_size: int = 2048) -> BoolArray:
    """Keep mask of ``embeddings`` (one row per item, in priority order).

    Args:
        embeddings: ``[n, d]`` vectors; normalised here, so any non-zero scale is fine.
        threshold: items whose cosine with an earlier kept item is at least this (within
            ``COSINE_TOLERANCE``) are dropped.
        block_size: items compared per matrix product; bounds memory at about
            ``block_size * 16384 * 4`` bytes for the similarity block.

    Returns:
        Boolean array of length ``n``: True for the items to keep.
    """
    raw = np.asarray(embeddings, dtype=np.float32)
    if len(raw) == 0:
        return np.zeros(0, dtype=bool)
    vectors = normalise(raw)
    n, dim = vectors.shape
    keep = np.zeros(n, dtype=bool)
    kept = np.empty((n, dim), dtype=np.float32)  # kept rows, filled in order; never re-concatenated
    n_kept = 0
    for start in range(0, n, block_size):
        block = vectors[start : start + block_size]
        hit = near_any(block, kept[:n_kept], threshold)
        local = greedy_within(block, ~hit, threshold)
        keep[start : start + len(block)] = local
        added = block[local]
        kept[n_kept : n_kept + len(added)] = added
        n_kept += len(added)
    return keep


def normalise(vectors: FloatArray) -> FloatArray:
    if vectors.ndim != 2:
        vectors = vectors.reshape(len(vectors), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def near_any(block: FloatArray, others: FloatArray, threshold: float, chunk: int = 16384) -> BoolArray:
    """For each row of ``block``: does any row of ``others`` have cosine >= threshold with it?"""
    hit = np.zeros(len(block), dtype=bool)
    for start in range(0, len(others), chunk):
        sims = block @ others[start : start + chunk].T
        hit |= (sims >= threshold - COSINE_TOLERANCE).any(axis=1)
    return hit


def greedy_within(block: FloatArray, candidate: BoolArray, threshold: float) -> BoolArray:
    """Greedy keep mask inside one block, among the ``candidate`` rows (those not already near a kept row)."""
    keep = candidate.copy()
    index = np.flatnonzero(candidate)
    if len(index) < 2:
        return keep
    rows = block[index]
    earlier = np.tril(
        rows @ rows.T >= threshold - COSINE_TOLERANCE, k=-1
    )  # earlier[i, j]: j comes before i and is near it
    local = np.ones(len(index), dtype=bool)
    for i in np.flatnonzero(earlier.any(axis=1)):  # only items with a near neighbour earlier in the block
        local[i] = not (earlier[i, :i] & local[:i]).any()
    keep[index] = local
    return keep
