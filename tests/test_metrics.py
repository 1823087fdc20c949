"""Every evaluation metric on hand-made inputs whose answer is known."""

import numpy as np
import pytest

from persllm.evaluate import metrics


def unit(*rows: list[float]) -> np.ndarray:
    matrix = np.asarray(rows, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


# --------------------------------------------------------------------------- reference overlap


def test_bleu_and_rouge_are_maximal_for_identical_texts() -> None:
    texts = ["the lamp is lit at dusk every night", "the sea does not forgive vanity"]
    assert metrics.bleu(texts, texts) == pytest.approx(100.0)
    assert metrics.rouge_l(texts, texts) == pytest.approx(1.0)


def test_bleu_and_rouge_are_minimal_for_disjoint_texts() -> None:
    hyps = ["alpha beta gamma delta", "one two three four"]
    refs = ["lamp wick oil glass", "harbour wall storm tide"]
    assert metrics.bleu(hyps, refs) == 0.0
    assert metrics.rouge_l(hyps, refs) == 0.0


def test_partial_overlap_lies_strictly_between() -> None:
    hyps = ["the lamp is lit at dusk"]
    refs = ["the lamp is lit before dawn"]
    assert 0.0 < metrics.rouge_l(hyps, refs) < 1.0  # type: ignore[operator]
    assert 0.0 < metrics.pair_bleu(hyps[0], refs[0]) < 100.0


def test_empty_inputs_give_none() -> None:
    assert metrics.bleu([], []) is None
    assert metrics.rouge_l([], []) is None


def test_pair_bleu_is_symmetric() -> None:
    a, b = "the keeper trims the wick at night", "at night the keeper trims the lamp"
    assert metrics.pair_bleu(a, b) == pytest.approx(metrics.pair_bleu(b, a))
    assert metrics.pair_bleu(a, a) == pytest.approx(100.0)


# --------------------------------------------------------------------------- distinction


KEYS = [
    ("elsie", "keeper", "i1"),
    ("elsie", "keeper", "i1"),
    ("elsie", "engineer", "i2"),
    ("jonah", "mayor", "i3"),
]


def test_distinction_pairs_are_grouped_by_persona_stage_and_item() -> None:
    pairs = metrics.distinction_pairs(KEYS)
    assert pairs["intra"] == [(0, 1)]
    assert pairs["stage"] == [(0, 2), (1, 2)]
    assert pairs["inter"] == [(0, 3), (1, 3), (2, 3)]


def test_distinction_pairs_are_capped_reproducibly() -> None:
    keys = [("p", "s", f"i{i // 2}") for i in range(40)] + [("q", "s", "x")]
    first = metrics.distinction_pairs(keys, max_pairs=5, seed=3)
    again = metrics.distinction_pairs(keys, max_pairs=5, seed=3)
    assert len(first["inter"]) == 5 and first == again


def test_distinction_separates_alike_from_unlike_outputs() -> None:
    same = "I keep the light at Skerrow Point and I write the weather in the log"
    texts = [
        same,
        same,
        "I keep the light and I write the log at Skerrow Point",
        "Debt is a thief of small towns",
    ]
    embeddings = unit([1, 0, 0], [1, 0, 0], [0.8, 0.6, 0], [0, 0, 1])
    result = metrics.distinction(texts, embeddings, KEYS)
    assert result["intra_bleu"] == pytest.approx(100.0)
    assert result["intra_cos"] == pytest.approx(1.0)
    assert result["stage_cos"] == pytest.approx(0.8)
    assert result["inter_cos"] == pytest.approx(0.0, abs=1e-6)
    assert result["intra_bleu"] > result["stage_bleu"] > result["inter_bleu"]  # type: ignore[operator]


def test_distinction_without_pairs_is_none() -> None:
    result = metrics.distinction(["one text"], unit([1, 0]), [("p", "s", "i")])
    assert result == {name: None for name in result} and len(result) == 6


# --------------------------------------------------------------------------- identifiability and style


def test_a_perfect_nearest_centroid_classifier_scores_one() -> None:
    refs = unit([1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1])
    labels = ["elsie", "elsie", "jonah", "jonah"]
    responses = unit([1, 0.05, 0], [0.05, 1, 0])
    assert metrics.nearest_centroid_accuracy(refs, labels, responses, ["elsie", "jonah"]) == 1.0
    assert metrics.nearest_centroid_accuracy(refs, labels, responses, ["jonah", "elsie"]) == 0.0
    assert metrics.nearest_centroid_accuracy(refs, labels, responses, ["elsie", "elsie"]) == 0.5


def test_classifier_needs_two_classes() -> None:
    refs = unit([1, 0], [0, 1])
    assert metrics.nearest_centroid_accuracy(refs, ["a", "a"], refs, ["a", "a"]) is None


def test_style_fidelity_sign_follows_whose_words_a_response_resembles() -> None:
    style = unit([1, 0], [0.9, 0.1], [0, 1])
    owners = ["elsie", "elsie", "jonah"]
    own_like = metrics.style_fidelity(unit([1, 0]), ["elsie"], style, owners)
    other_like = metrics.style_fidelity(unit([0, 1]), ["elsie"], style, owners)
    assert own_like is not None and own_like > 0.8
    assert other_like is not None and other_like < -0.8
    assert metrics.style_fidelity(unit([1, 0]), ["elsie"], style[:2], owners[:2]) is None


# --------------------------------------------------------------------------- anachronisms

EARLY = [
    "Elsie Wren keeps the oil lamp at Skerrow Point. In 1889 she trimmed the wick every night.",
    "The fishing fleet lands its herring at the Fish Quay.",
]
LATE = [
    "In 1902 Elsie became Resident Engineer to the Harbour Committee of Carrow Bay.",
    "The new breakwater is built of concrete. The breakwater shelters the fleet.",
    "Electric light now burns at Skerrow Point.",
    "She visited the town once.",
]


def test_later_only_terms_finds_names_years_and_characteristic_words() -> None:
    terms = metrics.later_only_terms(EARLY, LATE)
    assert {"1902", "harbour committee", "resident engineer", "breakwater", "carrow bay"} <= terms
    # Present earlier, or a plain word seen only once later: not a marker of the later stage.
    assert not {"skerrow point", "elsie", "fleet", "1889", "visited", "concrete"} & terms


def test_a_planted_anachronism_is_found() -> None:
    terms = metrics.later_only_terms(EARLY, LATE)
    planted = "I trim the wick nightly, though the breakwater will soon change all that."
    clean = "I trim the wick nightly and write the weather in the log at Skerrow Point."
    assert metrics.anachronisms(planted, terms) == ["breakwater"]
    assert metrics.anachronisms(clean, terms) == []
    flags = [bool(metrics.anachronisms(t, terms)) for t in (planted, clean)]
    assert metrics.anachronism_rate(flags) == 0.5


def test_a_term_the_question_brought_up_is_not_an_anachronism() -> None:
    terms = metrics.later_only_terms(EARLY, LATE)
    answer = "A breakwater? There is no such thing here."
    assert metrics.anachronisms(answer, terms, question="What do you think of the new breakwater?") == []
    assert metrics.anachronisms(answer, terms, question="How is the lamp?") == ["breakwater"]


def test_words_inside_longer_words_do_not_match() -> None:
    assert metrics.anachronisms("The breakwaters of other towns", {"breakwater"}) == []


def test_sentence_initial_capitals_are_not_names() -> None:
    found = metrics.names("Storms came in the night. Then Maud Hobb rowed out with Tully.")
    assert "storms" not in found and "then" not in found
    assert {"maud hobb", "tully", "hobb"} <= set(found)


def test_anachronism_rate_of_nothing_is_none() -> None:
    assert metrics.anachronism_rate([]) is None
    assert metrics.mean_or_none([None, 1, 3]) == 2.0
    assert metrics.mean_or_none([None]) is None


def test_every_reported_metric_has_a_one_line_definition() -> None:
    for name in [
        "bleu",
        "rouge_l",
        "intra_bleu",
        "persona_acc",
        "style_fidelity",
        "anachronism_rate",
        "win_rate",
    ]:
        assert name in metrics.DEFINITIONS
    assert all("\n" not in text and len(text) > 20 for text in metrics.DEFINITIONS.values())


def test_distinction_pairs_of_many_responses_are_drawn_not_enumerated() -> None:
    keys = [(f"p{(i // 2) % 3}", f"s{(i // 6) % 2}", f"i{i // 2}") for i in range(2100)]  # 2.2M pairs
    pairs = metrics.distinction_pairs(keys, max_pairs=300, seed=1)
    assert {name: len(found) for name, found in pairs.items()} == {"intra": 300, "stage": 300, "inter": 300}
    for i, j in pairs["intra"]:
        assert i < j and keys[i] == keys[j]
    for i, j in pairs["stage"]:
        assert i < j and keys[i][0] == keys[j][0] and keys[i][1] != keys[j][1]
    for i, j in pairs["inter"]:
        assert i < j and keys[i][0] != keys[j][0]
    assert pairs == metrics.distinction_pairs(keys, max_pairs=300, seed=1)
