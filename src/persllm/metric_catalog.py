"""Every metric the evaluation reports, declared once: its name, group, definition and direction.

The evaluation writes the definitions into ``metrics.json``; the report, the run summary, the model card
and the benchmark take their lists of metrics and their "lower is better" marks from here, and print
an estimate with its interval through ``fmt_estimate``.
"""

from dataclasses import dataclass
from typing import Any, Literal

Group = Literal[
    "generation", "distinction", "judged", "judge_health", "personality", "robustness", "likelihood"
]


@dataclass(frozen=True)
class Metric:
    name: str
    group: Group
    definition: str
    lower_is_better: bool = False


CATALOG: tuple[Metric, ...] = (
    Metric(
        "bleu",
        "generation",
        "Corpus sacreBLEU (0-100) of the responses against the golden responses of the same items.",
    ),
    Metric(
        "rouge_l",
        "generation",
        "Mean ROUGE-L F1 (0-1) of each response against its item's golden response.",
    ),
    Metric(
        "style_fidelity",
        "generation",
        "Mean cosine of a response to its persona's own training style passages minus its mean cosine to "
        "the other personas' (> 0: closer to its own words).",
    ),
    Metric(
        "persona_acc",
        "generation",
        "Persona identifiability: share of responses that a nearest-centroid classifier, fitted on the "
        "sentence embeddings of every persona's training style passages (own words, the held-out ones "
        "excluded), assigns to the right persona.",
    ),
    Metric(
        "stage_acc",
        "generation",
        "Stage identifiability: the same classifier with one centroid per stage of the response's "
        "persona; the share assigned to the right stage.",
    ),
    Metric(
        "anachronism_rate",
        "generation",
        "Share of responses at a non-final stage that mention a term found only in that persona's later-"
        "stage material (and not in the question).",
        lower_is_better=True,
    ),
    Metric(
        "intra_bleu",
        "distinction",
        "Intra: mean symmetric sentence BLEU between two samples for one item.",
    ),
    Metric(
        "stage_bleu",
        "distinction",
        "Stage: mean symmetric sentence BLEU between responses of one persona at different stages.",
    ),
    Metric(
        "inter_bleu",
        "distinction",
        "Inter: mean symmetric sentence BLEU between responses of different personas.",
    ),
    Metric(
        "intra_cos",
        "distinction",
        "Intra as embedding cosine: two samples for the same item.",
    ),
    Metric(
        "stage_cos",
        "distinction",
        "Stage as embedding cosine: one persona, different stages.",
    ),
    Metric(
        "inter_cos",
        "distinction",
        "Inter as embedding cosine: different personas.",
    ),
    Metric(
        "knowledge",
        "judged",
        "Judge: agreement of the response's facts with the golden response, 0-5.",
    ),
    Metric(
        "attitude",
        "judged",
        "Judge: agreement of the response's stance and tone with the golden response, 0-5.",
    ),
    Metric(
        "premise_detected",
        "judged",
        "Judge: share of responses to misleading questions that point out the false premise.",
    ),
    Metric(
        "win_rate",
        "judged",
        "Judge: share of items where the response beats the baseline's in both presentation orders; "
        "anything else is a tie unless the baseline wins both.",
    ),
    Metric(
        "tie_rate",
        "judged",
        "Judge: share of items without a consistent winner across the two orders.",
    ),
    Metric(
        "loss_rate",
        "judged",
        "Judge: share of items where the baseline's response wins in both orders.",
        lower_is_better=True,
    ),
    Metric(
        "position_flip_rate",
        "judge_health",
        "Judge hygiene: share of two-order preferences whose chosen letter stays the same when the "
        "answers swap places (the judge follows the position, not the answer).",
        lower_is_better=True,
    ),
    Metric(
        "win_rate_length_matched",
        "judge_health",
        "Judge hygiene: win rate over the pairs whose two answers differ in length by at most 25% of words.",
    ),
    Metric(
        "judges_kappa",
        "judge_health",
        "Judge hygiene: Cohen's kappa (scikit-learn) between the win/tie/loss outcomes of eval.judge and "
        "eval.second_judge.",
    ),
    Metric(
        "personality_distance",
        "personality",
        "Mean absolute difference between the questionnaire trait means (1-5) and the persona's declared "
        "target profile.",
        lower_is_better=True,
    ),
    Metric(
        "leak_rate",
        "robustness",
        "Robustness: share of boundary probes (an earlier stage asked about a term only its later "
        "material has) whose answer uses a later-only term, or takes up the asked one without disclaiming"
        " it (judge: uses or affirms that knowledge).",
        lower_is_better=True,
    ),
    Metric(
        "past_accuracy",
        "robustness",
        "Robustness: share of past probes (a term only this stage's material has) whose answer is closer "
        "in embedding to the source passage than to every one of 3 passages of other stages (chance 0.25;"
        " judge: consistent with the passage).",
    ),
    Metric(
        "boundary_score",
        "robustness",
        "Robustness: harmonic mean of (1 - leak_rate) and past_accuracy.",
    ),
    Metric(
        "premise_rejection",
        "robustness",
        "Robustness: share of misleading probes (a corpus sentence with its year or a name turned false) "
        "whose answer corrects the premise: a correcting phrase, or the true value named without the "
        "false one (judge: rejects or corrects the false claim).",
    ),
    Metric(
        "ooc_rate",
        "robustness",
        "Robustness: share of answers under 'you are an AI' pressure turns that speak as a model or "
        "assistant (phrase list; judge: breaks character).",
        lower_is_better=True,
    ),
    Metric(
        "sycophancy_flip",
        "robustness",
        "Robustness: share of push-backs (one without an argument, one with a weak one) after which the "
        "opinion answer gives in (a capitulating phrase) or moves away from the first answer (cosine "
        "below eval.robustness.flip_similarity; judge: gives up or reverses the stance).",
        lower_is_better=True,
    ),
    Metric(
        "turn_consistency",
        "robustness",
        "Robustness: share of a user-emulator conversation's answers that are in character (no out-of-"
        "character phrase and assigned to their own persona by the persona classifier; judge: in "
        "character).",
    ),
    Metric(
        "turn_slope",
        "robustness",
        "Robustness: least-squares slope of the in-character flags over turn number, per turn (< 0: "
        "drifting out of character).",
    ),
    Metric(
        "answer_consistency",
        "robustness",
        "Robustness: mean cosine between the answers to the same diagnostic questions at the start and at"
        " the end of a user-emulator conversation.",
    ),
    Metric(
        "heldout_nll",
        "likelihood",
        "Mean negative log-likelihood per token (nats/token) of the person's real held-out passage as the"
        " reply to its question, under the system's own prompt; lower = the system finds the person's "
        "real words more likely.",
        lower_is_better=True,
    ),
    Metric(
        "pick_real",
        "likelihood",
        "Share of held-out items where the real passage is more likely (per token) than every decoy given"
        " the same prompt; chance is 1 / (decoys + 1).",
    ),
    Metric(
        "pick_vs_other_stage",
        "likelihood",
        "Share where the real passage beats a held-out passage of the same persona at another stage "
        "(chance 0.5).",
    ),
    Metric(
        "pick_vs_other_persona",
        "likelihood",
        "Share where the real passage beats a held-out passage of another persona (chance 0.5).",
    ),
    Metric(
        "pick_vs_same_stage",
        "likelihood",
        "Share where the real passage beats another held-out passage of the same persona and stage "
        "(chance 0.5).",
    ),
    Metric(
        "stage_wins",
        "likelihood",
        "Share of held-out passages that are most likely under their own stage's prompt (time phrase and "
        "label) among all of the persona's stages; chance is 1 / stages.",
    ),
    Metric(
        "stage_margin",
        "likelihood",
        "Mean NLL per token of the passage under the persona's other stages' prompts minus under its own "
        "stage's (nats/token); above 0 = the own stage fits the real words better.",
    ),
)


def names(group: Group) -> tuple[str, ...]:
    """The metrics of ``group`` in the order every table shows them."""
    return tuple(metric.name for metric in CATALOG if metric.group == group)


def lower_is_better(group: Group) -> frozenset[str]:
    """The metrics of ``group`` where a smaller value is the better one."""
    return frozenset(m.name for m in CATALOG if m.group == group and m.lower_is_better)


def definitions(*groups: Group) -> dict[str, str]:
    """name -> one-line definition, for the given groups (all when none is given)."""
    return {m.name: m.definition for m in CATALOG if not groups or m.group in groups}


# The generation metrics the run summary and the model card head with, in that order.
HEADLINE = names("generation")


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def fmt_estimate(estimate: dict[str, Any] | None, signed: bool = False) -> str:
    """``0.412 [0.380, 0.445]`` from an interval dict; ``-`` for none."""
    if not estimate or estimate.get("value") is None:
        return "–"

    def one(value: float) -> str:
        digits = 2 if abs(value) >= 10 else 3
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"

    text = one(estimate["value"])
    if estimate.get("low") is not None and estimate.get("high") is not None:
        text += f" [{one(estimate['low'])}, {one(estimate['high'])}]"
    return text
