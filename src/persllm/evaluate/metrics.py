"""Evaluation metrics as pure functions of texts, labels and embeddings.

Every metric is declared, with its one-line definition, in ``persllm.metric_catalog``. Embeddings are
L2-normalised rows (``persllm.index.encoder.embed``), so a dot product is a cosine. A metric that cannot
be computed from what it was given (no pairs, a single class) is ``None``, never a made-up number.
"""

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from persllm.metric_catalog import definitions

DEFINITIONS = definitions("generation", "distinction", "judged", "judge_health", "personality", "robustness")

# --------------------------------------------------------------------------- reference overlap


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Corpus sacreBLEU of ``hypotheses[i]`` against ``references[i]`` (0-100)."""
    import sacrebleu

    if not hypotheses:
        return None
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 over aligned pairs (0-1)."""
    if not hypotheses:
        return None
    return float(np.mean(rouge_l_each(hypotheses, references)))


def rouge_l_each(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 (0-1) of each aligned pair."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [
        scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)
    ]


def pair_bleu(a: str, b: str) -> float:
    """Symmetric sentence BLEU of two texts: the mean of BLEU(a | b) and BLEU(b | a), 0-100."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(effective_order=True)
    return (scorer.sentence_score(a, [b]).score + scorer.sentence_score(b, [a]).score) / 2


# ------------------------------------------------------------------- distinction: Intra / Stage / Inter

Key = tuple[str, str, str]  # (persona, stage, item id)


EXACT_PAIRS = 2_000_000  # up to this many responses pairs (about 2000 responses) all are looked at


def distinction_pairs(
    keys: Sequence[Key], max_pairs: int = 400, seed: int = 0
) -> dict[str, list[tuple[int, int]]]:
    """Index pairs ``(i, j)``, ``i < j``, of responses for the three distinction groups, each capped at
    ``max_pairs`` by a seeded uniform draw (so results are reproducible).

    intra: same persona, stage and item (different samples); stage: same persona, different stage;
    inter: different personas. Beyond ``EXACT_PAIRS`` candidate pairs, stage and inter pairs are drawn
    from random pairs instead of all of them.
    """
    n = len(keys)
    rng = np.random.default_rng(seed)
    persona = _codes([k[0] for k in keys])
    stage = _codes([f"{k[0]}/{k[1]}" for k in keys])
    groups: dict[Key, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    intra = [(a, b) for members in groups.values() for x, a in enumerate(members) for b in members[x + 1 :]]
    if n * (n - 1) // 2 <= EXACT_PAIRS:
        left, right = np.triu_indices(n, 1)
    else:
        draws = np.sort(rng.integers(0, n, size=(max_pairs * 200, 2)), axis=1)
        draws = np.unique(draws[draws[:, 0] < draws[:, 1]], axis=0)
        left, right = draws[:, 0], draws[:, 1]
    same_persona = persona[left] == persona[right]
    found = {
        "intra": np.asarray(sorted(intra), dtype=np.int64).reshape(-1, 2),
        "stage": np.stack([left, right], axis=1)[same_persona & (stage[left] != stage[right])],
        "inter": np.stack([left, right], axis=1)[~same_persona],
    }
    result: dict[str, list[tuple[int, int]]] = {}
    for name, pairs in found.items():
        if len(pairs) > max_pairs:
            pairs = pairs[np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
        result[name] = [(int(a), int(b)) for a, b in pairs]
    return result


def _codes(values: list[str]) -> np.ndarray:
    index = {value: code for code, value in enumerate(dict.fromkeys(values))}
    return np.asarray([index[v] for v in values], dtype=np.int64)


def distinction_values(
    texts: Sequence[str], embeddings: np.ndarray, keys: Sequence[Key], max_pairs: int = 400, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-pair values of the Intra / Stage / Inter groups: pair BLEU and pair cosine, one array each."""
    result: dict[str, np.ndarray] = {}
    for name, pairs in distinction_pairs(keys, max_pairs, seed).items():
        result[f"{name}_bleu"] = np.asarray([pair_bleu(texts[i], texts[j]) for i, j in pairs], dtype=float)
        left = embeddings[[i for i, _ in pairs]] if pairs else np.zeros((0, 1))
        right = embeddings[[j for _, j in pairs]] if pairs else np.zeros((0, 1))
        result[f"{name}_cos"] = np.sum(left * right, axis=1).astype(float)
    return result


def distinction(
    texts: Sequence[str], embeddings: np.ndarray, keys: Sequence[Key], max_pairs: int = 400, seed: int = 0
) -> dict[str, float | None]:
    """Intra / Stage / Inter similarity as mean pair BLEU and mean pair cosine (see ``DEFINITIONS``)."""
    values = distinction_values(texts, embeddings, keys, max_pairs, seed)
    return {name: float(np.mean(v)) if len(v) else None for name, v in values.items()}


# --------------------------------------------------------------------------- identifiability and style


def nearest_centroid_accuracy(
    ref_embeddings: np.ndarray, ref_labels: Sequence[str], embeddings: np.ndarray, labels: Sequence[str]
) -> float | None:
    """Accuracy of assigning each row of ``embeddings`` to the closest (cosine) centroid of its class.

    Centroids are the means of ``ref_embeddings`` per label. ``None`` with fewer than two classes (there
    is nothing to tell apart) or nothing to classify.
    """
    if len(labels) == 0:
        return None
    predicted = nearest_centroid_predict(ref_embeddings, ref_labels, embeddings)
    return float(np.mean(predicted == np.asarray(labels))) if predicted is not None else None


def nearest_centroid_predict(
    ref_embeddings: np.ndarray, ref_labels: Sequence[str], embeddings: np.ndarray
) -> np.ndarray | None:
    """The label of the closest (cosine) class centroid for each row; ``None`` with fewer than two classes."""
    classes = sorted(set(ref_labels))
    if len(classes) < 2:
        return None
    ref_array = np.asarray(ref_labels)
    centroids = np.stack([ref_embeddings[ref_array == c].mean(axis=0) for c in classes])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return np.asarray(classes)[np.argmax(embeddings @ centroids.T, axis=1)]


def style_fidelity(
    embeddings: np.ndarray,
    personas: Sequence[str],
    style_embeddings: np.ndarray,
    style_personas: Sequence[str],
) -> float | None:
    """Mean over responses of (mean cosine to own persona's style chunks - mean cosine to others').

    ``None`` when no response has both own and other personas' style chunks to compare with.
    """
    owners = np.asarray(style_personas)
    scores: list[float] = []
    for vector, persona in zip(embeddings, personas, strict=True):
        own, other = owners == persona, owners != persona
        if not own.any() or not other.any():
            continue
        cosines = style_embeddings @ vector
        scores.append(float(cosines[own].mean() - cosines[other].mean()))
    return float(np.mean(scores)) if scores else None


# --------------------------------------------------------------------------- anachronisms

_CAPITALISED = re.compile(r"\b[A-Z][a-zA-Z'’-]+(?:[ \t]+[A-Z][a-zA-Z'’-]+)*")
_YEAR = re.compile(r"\b(?:1[5-9]\d\d|20\d\d)\b")
_WORD = re.compile(r"\b[a-z][a-z'’-]*[a-z]\b")
RARE_WORD_LENGTH = 8
_COMMON_WORDS = """
    a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
    nor not now of off on once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too under until up very
    was we were what when where which while who whom why will with would you your yours yourself yourselves
    yes mr mrs miss sir madam dear god lord one two three four five six seven eight nine ten first last
    monday tuesday wednesday thursday friday saturday sunday january february march april may june july august
    september october november december i'm i've i'd i'll it's don't
    absolutely according actually although anything anywhere beautiful becoming beginning believed believes
    business certainly children complete completely consider continue continued daughter describe different
    difficult directly discover distance everybody everyone everything evidence exactly experience finally
    following generally happened happening important interest interested knowledge language learning
    meanwhile minister mountain national naturally necessary neighbour neighbours nevertheless nothing
    numerous obviously otherwise particular particularly perfectly perhaps personal political position
    possible possibly practical presence probably question questions quickly received recently remember
    remembered responsible scarcely sentence somebody something sometimes somewhere standing straight
    strength students suddenly thinking thousand together tomorrow training understand understood whatever
    whenever wherever whether yesterday yourself themselves ourselves ordinary provided regarded supported
    estimated proposed dangerous different including increased improved required returned reported
    eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty
    hundred twenty-one twenty-two twenty-three twenty-four twenty-five"""
_COMMON = set(_COMMON_WORDS.split())


def names(text: str) -> Counter[str]:
    """Lower-cased names with counts: runs of capitalised words (trimmed of common words) and their
    words; the first word of a sentence only counts inside a longer run (there capitals say nothing)."""
    found: Counter[str] = Counter()
    for match in _CAPITALISED.finditer(text):
        words = match.group().split()
        before = text[: match.start()].rstrip()
        at_start = not before or before[-1] in ".!?:;\"“‘'(\n"
        singles = words[1:] if at_start else words
        found.update(w.lower() for w in singles if _is_name_word(w))
        core = [i for i, w in enumerate(words) if _is_name_word(w)]
        if len(core) > 1:
            found[" ".join(words[core[0] : core[-1] + 1]).lower()] += 1
    return found


def _is_name_word(word: str) -> bool:
    return len(word) > 2 and word.lower() not in _COMMON


def candidate_terms(text: str) -> Counter[str]:
    """Lower-cased candidate terms of a text with their counts: names (see ``names``), four-digit
    years, and long (8+ letters) lower-case content words that are not common English words."""
    terms = names(text)
    terms.update(_YEAR.findall(text))
    terms.update(w for w in _WORD.findall(text) if len(w) >= RARE_WORD_LENGTH and w not in _COMMON)
    return terms


def later_only_terms(earlier: Iterable[str], later: Iterable[str]) -> set[str]:
    """Terms of the later-stage material that never occur in the earlier-stage material.

    Names and years count from one occurrence; a plain lower-case word must occur at least twice in the
    later material (characteristic of that stage, not a stray word).
    """
    earlier_text = " ".join(earlier).lower()
    later_text = " ".join(later)
    named = names(later_text)
    result: set[str] = set()
    for term, count in candidate_terms(later_text).items():
        if _mentions(earlier_text, term):
            continue
        if term in named or _YEAR.fullmatch(term) or count >= 2:
            result.add(term)
    return result


def _mentions(lowered: str, term: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", lowered) is not None


def anachronisms(response: str, terms: set[str], question: str = "") -> list[str]:
    """The later-only ``terms`` that ``response`` mentions and the question did not bring up."""
    lowered, asked = response.lower(), question.lower()
    return sorted(t for t in terms if _mentions(lowered, t) and not _mentions(asked, t))


def anachronism_rate(flags: Sequence[bool]) -> float | None:
    """Share of flagged responses; ``None`` when no response could be checked."""
    return float(np.mean(flags)) if len(flags) else None


# --------------------------------------------------------------------------- small aggregates


def mean_or_none(values: Iterable[float | int | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
