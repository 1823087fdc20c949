import numpy as np
import pytest
import sacrebleu

from persllm import stats
from persllm.stats import Estimate

HYPOTHESES = [
    "the cat sat on the mat",
    "a dog barked at the postman all morning",
    "she wrote letters to her sister every week",
    "the river was high after the long rain",
    "he never liked the city in winter",
    "we walked home along the old canal road",
]
REFERENCES = [
    "the cat sat on a mat",
    "the dog barked at the postman in the morning",
    "she wrote to her sister every single week",
    "after the long rain the river was high",
    "he did not like the city in the winter",
    "we walked home by the canal",
]


def test_resample_indices_shape_range_and_seed() -> None:
    drawn = stats.resample_indices(25, resamples=200, seed=3)
    assert drawn.shape == (200, 25)
    assert drawn.dtype == np.int64
    assert drawn.min() >= 0 and drawn.max() < 25
    assert np.array_equal(drawn, stats.resample_indices(25, resamples=200, seed=3))
    assert not np.array_equal(drawn, stats.resample_indices(25, resamples=200, seed=4))
    assert stats.resample_indices(25).shape == (stats.RESAMPLES, 25)
    assert stats.RESAMPLES >= 1000


def test_resample_indices_no_items() -> None:
    assert stats.resample_indices(0, resamples=50).shape == (50, 0)


def test_mean_estimate_value_is_the_mean_and_interval_contains_it() -> None:
    values = np.random.default_rng(0).normal(0.5, 0.2, size=40)
    estimate = stats.mean_estimate(values, stats.resample_indices(40))
    assert estimate.value == pytest.approx(float(values.mean()))
    assert estimate.n == 40
    assert estimate.low is not None and estimate.high is not None
    assert estimate.low < estimate.value < estimate.high


def test_mean_estimate_narrows_with_more_items() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 400):
        estimate = stats.mean_estimate(rng.normal(0.0, 1.0, size=n), stats.resample_indices(n, seed=2))
        assert estimate.low is not None and estimate.high is not None
        widths.append(estimate.high - estimate.low)
    assert widths[1] < widths[0] / 2


def test_mean_estimate_ignores_missing_values() -> None:
    values = [1.0, None, 3.0, float("nan"), 5.0]
    estimate = stats.mean_estimate(values, stats.resample_indices(len(values)))
    assert estimate.value == pytest.approx(3.0)
    assert estimate.n == 3
    assert estimate.low is not None and estimate.high is not None
    assert 1.0 <= estimate.low <= estimate.high <= 5.0


def test_mean_estimate_without_any_value() -> None:
    values = [None, None, float("nan")]
    estimate = stats.mean_estimate(values, stats.resample_indices(len(values)))
    assert estimate == Estimate(None, None, None, 0)
    assert estimate.format() == "-"
    assert not estimate.excludes_zero()


def test_mean_difference_detects_a_better_system() -> None:
    rng = np.random.default_rng(5)
    b = rng.uniform(0.0, 1.0, size=50)
    a = b + 0.5 + rng.normal(0.0, 0.05, size=50)
    estimate = stats.mean_difference(a, b, stats.resample_indices(50))
    assert estimate.value == pytest.approx(float(a.mean() - b.mean()))
    assert estimate.excludes_zero()
    assert estimate.low is not None and estimate.low > 0


def test_mean_difference_of_identical_systems_contains_zero() -> None:
    values = np.random.default_rng(6).uniform(size=30)
    estimate = stats.mean_difference(values, values.copy(), stats.resample_indices(30))
    assert estimate.value == pytest.approx(0.0)
    assert estimate.low is not None and estimate.high is not None
    assert estimate.low <= 0.0 <= estimate.high
    assert not estimate.excludes_zero()


def test_mean_difference_uses_only_items_valid_in_both() -> None:
    a = [1.0, 2.0, None, 4.0, 10.0]
    b = [0.0, 1.0, 3.0, float("nan"), 9.0]
    estimate = stats.mean_difference(a, b, stats.resample_indices(5))
    assert estimate.n == 3
    assert estimate.value == pytest.approx(1.0)
    assert estimate.low == pytest.approx(1.0)
    assert estimate.high == pytest.approx(1.0)


def test_mean_difference_rejects_unpaired_lengths() -> None:
    with pytest.raises(ValueError):
        stats.mean_difference([1.0, 2.0], [1.0], stats.resample_indices(2))


def test_percentile_interval() -> None:
    low, high = stats.percentile_interval(np.arange(101, dtype=float), 0.9)
    assert low == pytest.approx(5.0)
    assert high == pytest.approx(95.0)
    assert stats.percentile_interval(np.asarray([1.0, np.nan]), 0.95) == (None, None)
    assert stats.percentile_interval(np.zeros(0), 0.95) == (None, None)


def test_bleu_from_statistics_equals_corpus_bleu() -> None:
    table = stats.bleu_statistics(HYPOTHESES, REFERENCES)
    assert table.shape[0] == len(HYPOTHESES)
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    assert stats.bleu_from_statistics(table) == pytest.approx(expected)
    subset = [0, 2, 3]
    expected_subset = sacrebleu.corpus_bleu(
        [HYPOTHESES[i] for i in subset], [[REFERENCES[i] for i in subset]]
    ).score
    assert stats.bleu_from_statistics(table[subset]) == pytest.approx(expected_subset)


def test_bleu_statistics_without_sentences() -> None:
    table = stats.bleu_statistics([], [])
    assert table.shape == (0, stats.bleu_statistics(HYPOTHESES[:1], REFERENCES[:1]).shape[1])


def test_bleu_estimate_value_is_corpus_bleu() -> None:
    table = stats.bleu_statistics(HYPOTHESES, REFERENCES)
    estimate = stats.bleu_estimate(table, stats.resample_indices(len(table)))
    assert estimate.value == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    assert estimate.n == len(HYPOTHESES)
    assert estimate.low is not None and estimate.high is not None
    assert 0.0 <= estimate.low <= estimate.value <= estimate.high <= 100.0


def test_bleu_estimate_of_summed_samples_per_item() -> None:
    table = stats.bleu_statistics(HYPOTHESES, REFERENCES)
    per_item = table[0::2] + table[1::2]
    estimate = stats.bleu_estimate(per_item, stats.resample_indices(len(per_item)))
    assert estimate.value == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    assert estimate.n == 3


def test_bleu_estimate_without_items() -> None:
    table = stats.bleu_statistics([], [])
    assert stats.bleu_estimate(table, stats.resample_indices(0)) == Estimate(None, None, None, 0)


def test_bleu_difference_against_itself_is_zero() -> None:
    table = stats.bleu_statistics(HYPOTHESES, REFERENCES)
    estimate = stats.bleu_difference(table, table.copy(), stats.resample_indices(len(table)))
    assert estimate.value == pytest.approx(0.0)
    assert estimate.low == pytest.approx(0.0)
    assert estimate.high == pytest.approx(0.0)
    assert not estimate.excludes_zero()


def test_bleu_difference_detects_a_better_system() -> None:
    hypotheses = HYPOTHESES * 5
    references = REFERENCES * 5
    good = stats.bleu_statistics(references, references)
    bad = stats.bleu_statistics(hypotheses, references)
    estimate = stats.bleu_difference(good, bad, stats.resample_indices(len(good)))
    expected = 100.0 - sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert estimate.value == pytest.approx(expected)
    assert estimate.excludes_zero()


def test_bleu_bootstrap_of_many_items() -> None:
    hypotheses = HYPOTHESES * 10
    references = REFERENCES * 10
    table = stats.bleu_statistics(hypotheses, references)
    estimate = stats.bleu_estimate(table, stats.resample_indices(len(table)))
    assert estimate.n == 60
    assert estimate.low is not None and estimate.high is not None
    assert estimate.low < estimate.high


def test_estimate_format() -> None:
    assert Estimate(0.412, 0.38, 0.445, 50).format() == "0.412 [0.380, 0.445]"
    assert Estimate(0.12, 0.05, 0.19, 50).format(signed=True) == "+0.120 [+0.050, +0.190]"
    assert Estimate(-0.12, -0.2, 0.01, 50).format(signed=True) == "-0.120 [-0.200, +0.010]"
    assert Estimate(31.24, 28.5, 34.0, 50).format(digits=1) == "31.2 [28.5, 34.0]"
    assert Estimate(0.5, None, None, 1).format() == "0.500"
    assert Estimate(None, None, None, 0).format(signed=True) == "-"


def test_estimate_to_dict() -> None:
    estimate = Estimate(1 / 3, 0.1234567891, 2 / 3, 12)
    assert estimate.to_dict() == {"value": 0.333333, "low": 0.123457, "high": 0.666667, "n": 12}
    assert Estimate(None, None, None, 0).to_dict() == {"value": None, "low": None, "high": None, "n": 0}


def test_estimate_excludes_zero() -> None:
    assert Estimate(0.2, 0.1, 0.3, 40).excludes_zero()
    assert Estimate(-0.2, -0.3, -0.1, 40).excludes_zero()
    assert not Estimate(0.1, -0.1, 0.3, 40).excludes_zero()
    assert not Estimate(0.0, 0.0, 0.0, 40).excludes_zero()
    assert not Estimate(0.2, None, None, 1).excludes_zero()
