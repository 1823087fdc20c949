"""Paired bootstrap confidence intervals for evaluation metrics: items resampled with replacement, seeded.

Every metric of every system on one evaluation set is resampled with the *same* item draws
(``resample_indices``), so the interval of a "system - baseline" difference is paired: the noise of
which items happened to be drawn cancels. Intervals are percentile intervals. Corpus BLEU is not a mean
of per-item scores, so it is bootstrapped from per-item sufficient statistics (n-gram matches and
lengths, summed per resample), which gives exactly corpus BLEU of the drawn items and is fast.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
SMALL_SAMPLE = 30  # fewer items than this: the report flags the interval as a small sample

Values = Sequence[float | None] | np.ndarray


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[resamples, n]`` int64 item indices drawn with replacement (``(resamples, 0)`` for no items)."""
    if n == 0:
        return np.zeros((resamples, 0), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int64)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


@dataclass(frozen=True)
class Estimate:
    """A metric on all items (``value``) with its bootstrap interval [``low``, ``high``] over ``n`` items."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def excludes_zero(self) -> bool:
        if self.low is None or self.high is None:
            return False
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": _rounded(self.value),
            "low": _rounded(self.low),
            "high": _rounded(self.high),
            "n": self.n,
        }

    def format(self, signed: bool = False, digits: int = 3) -> str:
        """``"0.412 [0.380, 0.445]"``; ``signed`` prints every number with its sign; no value: ``"-"``."""
        if self.value is None:
            return "-"
        spec = f"{'+' if signed else ''}.{digits}f"
        text = format(self.value, spec)
        if self.low is not None and self.high is not None:
            text += f" [{format(self.low, spec)}, {format(self.high, spec)}]"
        return text


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    """The two-sided percentile interval of the finite ``samples``; (None, None) with fewer than two."""
    finite = np.asarray(samples, dtype=float)
    finite = finite[np.isfinite(finite)]
    if len(finite) < 2:
        return None, None
    low, high = np.percentile(finite, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
    return float(low), float(high)


def _as_array(values: Values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def resampled_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The nanmean of every resample (NaN where a resample drew only NaN items)."""
    if values.size == 0 or indices.size == 0:
        return np.zeros(0)
    drawn = values[indices]
    valid = np.isfinite(drawn)
    counts = valid.sum(axis=1)
    sums = np.where(valid, drawn, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(sums), np.nan), where=counts > 0)


def mean_estimate(values: Values, indices: np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
    """Mean of per-item values (None/NaN: the item has no value, ignored) with its bootstrap interval.

    ``indices`` comes from ``resample_indices(len(values), ...)``; a resample that drew only items
    without a value has no mean and is dropped.
    """
    array = _as_array(values)
    finite = np.isfinite(array)
    if not finite.any():
        return Estimate(None, None, None, 0)
    low, high = percentile_interval(resampled_means(array, indices), confidence)
    return Estimate(float(array[finite].mean()), low, high, int(finite.sum()))


def mean_difference(a: Values, b: Values, indices: np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
    """Paired ``mean(a) - mean(b)`` over the items valid in both, with the same draws on both sides.

    An item with a value for only one system is left out of both means, so the difference never
    compares different item sets.
    """
    first, second = _as_array(a), _as_array(b)
    if len(first) != len(second):
        raise ValueError(f"paired values differ in length: {len(first)} vs {len(second)}")
    both = np.isfinite(first) & np.isfinite(second)
    return mean_estimate(np.where(both, first - second, np.nan), indices, confidence)


def _bleu() -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU()


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-sentence sufficient statistics of corpus sacreBLEU, ``[n, k]`` (lengths, matches, totals)."""
    scorer = _bleu()
    if not hypotheses:
        return np.zeros((0, 2 + 2 * scorer.max_ngram_order))
    stats = scorer._extract_corpus_statistics(list(hypotheses), [list(references)])
    return np.asarray(stats, dtype=float)


def _scores(scorer: Any, totals: np.ndarray) -> np.ndarray:
    """BLEU of every row of summed statistics ``[m, k]``."""
    rows = np.rint(totals).astype(np.int64).tolist()
    return np.asarray([scorer._compute_score_from_stats(row).score for row in rows], dtype=float)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) of the sentences whose statistics are the rows of ``stats``."""
    return float(_scores(_bleu(), np.asarray(stats, dtype=float).sum(axis=0, keepdims=True))[0])


def _resampled_bleu(stats: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return _scores(_bleu(), np.asarray(stats, dtype=float)[indices].sum(axis=1))


def bleu_estimate(stats: np.ndarray, indices: np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
    """Corpus BLEU of per-item statistics with its bootstrap interval.

    A row of ``stats`` is one item; when an item has several samples, its row is the sum of their
    sentences' statistics, so items (not sentences) are what gets resampled.
    """
    if len(stats) == 0:
        return Estimate(None, None, None, 0)
    low, high = percentile_interval(_resampled_bleu(stats, indices), confidence)
    return Estimate(bleu_from_statistics(stats), low, high, len(stats))


def bleu_difference(
    stats_a: np.ndarray, stats_b: np.ndarray, indices: np.ndarray, confidence: float = CONFIDENCE
) -> Estimate:
    """Paired ``BLEU(a) - BLEU(b)``: each resample draws the same items for both systems."""
    if len(stats_a) != len(stats_b):
        raise ValueError(f"paired statistics differ in length: {len(stats_a)} vs {len(stats_b)}")
    if len(stats_a) == 0:
        return Estimate(None, None, None, 0)
    deltas = _resampled_bleu(stats_a, indices) - _resampled_bleu(stats_b, indices)
    low, high = percentile_interval(deltas, confidence)
    return Estimate(bleu_from_statistics(stats_a) - bleu_from_statistics(stats_b), low, high, len(stats_a))
