"""The judge: 0-5 agreement with the reference, false-premise detection, and two-order preference.

Prompt building and output parsing are pure functions; ``judge_rows`` makes the calls. Pairwise
preference is asked twice, with the two answers swapped, and only a choice that survives the swap
counts (a judge that always says "A" produces ties, not wins).
"""

import asyncio
import re
from pathlib import Path
from typing import Any

from persllm import stats
from persllm.config.llm import LLMConfig
from persllm.llm import make_backend
from persllm.llm.base import ChatBackend, Message
from persllm.prompting import parse_yes_no, read_template

PROMPTS = Path(__file__).with_name("prompts")


def render(template: str, /, **values: str) -> str:
    """Fill the template ``prompts/<template>.txt`` with ``values``."""
    return read_template(PROMPTS, f"{template}.txt").format(**values).strip()


# --------------------------------------------------------------------------- prompts


def agreement_messages(question: str, reference: str, response: str) -> list[Message]:
    text = render(
        "judge_agreement", question=question, reference=reference, response=response or "(no answer)"
    )
    return [{"role": "user", "content": text}]


def premise_messages(question: str, reference: str, response: str) -> list[Message]:
    text = render("judge_premise", question=question, reference=reference, response=response or "(no answer)")
    return [{"role": "user", "content": text}]


def preference_messages(
    persona: str, time: str, question: str, reference: str, first: str, second: str
) -> list[Message]:
    text = render(
        "judge_preference",
        persona=persona,
        time=time,
        question=question,
        reference=reference,
        first=first or "(no answer)",
        second=second or "(no answer)",
    )
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- parsing


def _grade(label: str, text: str) -> int | None:
    match = re.search(rf"{label}[^\w\n]{{0,8}}(\d+)", text, flags=re.IGNORECASE)
    if match is None:
        return None
    value = int(match.group(1))
    return value if 0 <= value <= 5 else None


def parse_agreement(text: str) -> tuple[int | None, int | None]:
    """(knowledge, attitude) grades 0-5 from ``Knowledge: N`` / ``Attitude: N`` lines; None if absent."""
    return _grade("knowledge", text), _grade("attitude", text)


def pick_messages(persona: str, time: str, question: str, candidates: list[str]) -> list[Message]:
    """Ask which of ``candidates`` (shown as A, B, C, ...) is the person's real reply."""
    listed = "\n\n".join(f"Passage {LETTERS[i]}:\n{text}" for i, text in enumerate(candidates))
    text = render("judge_pick", persona=persona, time=time, question=question, candidates=listed)
    return [{"role": "user", "content": text}]


LETTERS = "ABCDEFGH"


def parse_letter(text: str, count: int) -> int | None:
    """The index of the first standalone letter among the ``count`` offered (``"C"`` -> 2); None if none."""
    allowed = LETTERS[:count]
    match = re.search(rf"\b(?:passage\s+)?([{allowed}])\b", text.strip())
    return None if match is None else allowed.index(match.group(1))


def parse_choice(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a preference verdict; None when unreadable."""
    first = re.match(r"\W*(\w+)", text)
    if first is not None:
        word = first.group(1)
        if word in ("A", "B"):
            return word
        if word.lower() in ("tie", "neither", "equal", "both"):
            return "tie"
    named = re.search(r"\b(?:answer|option)\s+([AB])\b", text, flags=re.IGNORECASE)
    if named is not None:
        return named.group(1).upper()
    if re.search(r"\btie\b", text, flags=re.IGNORECASE):
        return "tie"
    return None


def two_order_outcome(system_first: str | None, system_second: str | None) -> str:
    """Combine the verdicts with the system's answer shown as A, then as B: ``win``, ``loss`` or ``tie``.

    A win needs the system preferred in both orders, a loss the baseline preferred in both.
    """
    if system_first == "A" and system_second == "B":
        return "win"
    if system_first == "B" and system_second == "A":
        return "loss"
    return "tie"


# --------------------------------------------------------------------------- calls


async def judge_rows(
    backend: ChatBackend,
    params: dict[str, Any],
    rows: list[dict[str, Any]],
    baseline: dict[tuple[str, int], str] | None = None,
    personas: dict[str, tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Judge generation rows (see ``evaluate.engine``) and return one verdict dict per row.

    Args:
        backend: the judge model.
        params: the judge's sampling settings.
        rows: rows with question, reference, response, kind, item, sample, persona, stage.
        baseline: the baseline system's response per ``(item, sample)``; preference is asked when given
            and the row is not the baseline's own.
        personas: display name and time phrase per ``"persona/stage"`` for the preference prompt.
    """

    async def ask(messages: list[Message]) -> str:
        return (await backend.generate(messages, params)).text

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        question, reference, response = row["question"], row["reference"], row["response"]
        verdict: dict[str, Any] = {}
        knowledge, attitude = parse_agreement(await ask(agreement_messages(question, reference, response)))
        verdict.update(knowledge=knowledge, attitude=attitude)
        if row.get("kind") == "misleading":
            verdict["premise_detected"] = parse_yes_no(
                await ask(premise_messages(question, reference, response))
            )
        other = (baseline or {}).get((row["item"], row["sample"]))
        if other is not None:
            name, time = (personas or {}).get(f"{row['persona']}/{row['stage']}", (row["persona"], ""))
            first, second = await asyncio.gather(
                ask(preference_messages(name, time, question, reference, response, other)),
                ask(preference_messages(name, time, question, reference, other, response)),
            )
            orders = [parse_choice(first), parse_choice(second)]
            verdict["preference"] = two_order_outcome(*orders)
            verdict["preference_orders"] = orders  # the choice with the system's answer shown as A, then as B
        return verdict

    return list(await asyncio.gather(*(one(row) for row in rows)))


def resolve_judge(configured: LLMConfig | None, override: LLMConfig | str | None) -> LLMConfig | None:
    """The judge to use: ``override`` (a config, a model, a URL or ``MODEL@URL``) or the configured one.

    A URL means an OpenAI-compatible endpoint; a bare model name keeps the configured judge's backend
    and endpoint, or runs that model locally when no judge is configured.
    """
    if override is None or isinstance(override, LLMConfig):
        return override or configured
    model, _, url = override.rpartition("@") if "@http" in override else ("", "", override)
    if url.startswith(("http://", "https://")):
        fallback = configured.model if configured is not None and configured.backend == "openai" else "judge"
        return LLMConfig.model_validate({"backend": "openai", "base_url": url, "model": model or fallback})
    if configured is not None and configured.backend == "openai":
        return configured.model_copy(update={"model": override})
    return LLMConfig.model_validate({"backend": "transformers", "model": override})


def judge_all(
    cfg: LLMConfig,
    cache: Any,
    params: dict[str, Any],
    rows: list[dict[str, Any]],
    baseline: str | None,
    personas: dict[str, tuple[str, str]],
    key: str = "judge",
) -> int:
    """Judge the first sample of every row in place (``row[key]``); returns how many were judged."""
    targets = [row for row in rows if row["sample"] == 0]
    reference = {(r["item"], r["sample"]): r["response"] for r in targets if r["system"] == baseline}
    others = [row for row in targets if row["system"] != baseline]
    own = [row for row in targets if row["system"] == baseline]

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        backend = make_backend(cfg, cache)
        try:
            first, second = await asyncio.gather(
                judge_rows(backend, params, others, reference or None, personas),
                judge_rows(backend, params, own, None, personas),
            )
        finally:
            await backend.aclose()
        return first, second

    verdicts_others, verdicts_own = asyncio.run(both())
    for row, verdict in [*zip(others, verdicts_others, strict=True), *zip(own, verdicts_own, strict=True)]:
        row[key] = verdict
    return len(targets)


def validity(
    cfg: LLMConfig,
    cache: Any,
    params: dict[str, Any],
    plans: list[Any],
    personas: dict[str, tuple[str, str]],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """How well the judge itself tells the person's real passage from the likelihood metrics' decoys:
    its accuracy (with a 95% interval) beside chance, printed next to every judge score. Candidates are
    shown in a seeded order per item; an unreadable verdict counts as a miss and is counted."""
    import numpy as np

    asked = [p for p in plans if p.decoys]
    if not asked:
        return {}
    orders = []
    for number, entry in enumerate(asked):
        candidates = [entry.item.reference, *entry.decoys.values()]
        order = np.random.default_rng([seed, number]).permutation(len(candidates)).tolist()
        orders.append((order, [candidates[i] for i in order]))

    async def ask_all() -> list[str]:
        backend = make_backend(cfg, cache)
        try:
            calls = []
            for entry, (_, shown) in zip(asked, orders, strict=True):
                item = entry.item
                name, time = personas.get(f"{item.persona}/{item.stage}", (item.persona, ""))
                calls.append(backend.generate(pick_messages(name, time, item.question, shown), params))
            replies = await asyncio.gather(*calls)
        finally:
            await backend.aclose()
        return [reply.text for reply in replies]

    verdicts = asyncio.run(ask_all())
    correct, unreadable = [], 0
    for (order, shown), text in zip(orders, verdicts, strict=True):
        picked = parse_letter(text, len(shown))
        unreadable += picked is None
        correct.append(float(picked is not None and order[picked] == 0))
    indices = stats.resample_indices(len(correct), resamples, seed)
    return {
        "accuracy": stats.mean_estimate(correct, indices).to_dict(),
        "chance": float(np.mean([1 / len(shown) for _, shown in orders])),
        "items": len(correct),
        "unreadable": unreadable,
    }


# --------------------------------------------------------------------------- judge hygiene

LENGTH_MATCH = 0.25  # a pair is length-matched when the two answers' word counts differ by at most 25%


def position_flipped(orders: list[str | None]) -> bool | None:
    """Whether the preferred answer changed when the two answers swapped places (the judge followed the
    position, not the answer); None unless both orders gave a choice of A or B."""
    first, second = orders
    if first not in ("A", "B") or second not in ("A", "B"):
        return None
    return first == second


def length_matched(a: str, b: str) -> bool:
    long, short = max(len(a.split()), len(b.split())), min(len(a.split()), len(b.split()))
    return long == 0 or (long - short) / long <= LENGTH_MATCH


def hygiene(
    rows: list[dict[str, Any]], baseline: str, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per judged system: the position-flip rate, the win rate with and without length control, and the
    agreement (Cohen's kappa) of the two judges' outcomes when a second judge ran; each with an interval."""

    base = {(r["item"], r["sample"]): r["response"] for r in rows if r["system"] == baseline}
    result: dict[str, Any] = {}
    for system in dict.fromkeys(r["system"] for r in rows if r["system"] != baseline):
        pairs = [
            r
            for r in rows
            if r["system"] == system
            and "preference" in (r.get("judge") or {})
            and (r["item"], r["sample"]) in base
        ]
        if not pairs:
            continue
        indices = stats.resample_indices(len(pairs), resamples, seed)
        flipped = [position_flipped(r["judge"].get("preference_orders", [None, None])) for r in pairs]
        wins = [float(r["judge"]["preference"] == "win") for r in pairs]
        matched = [length_matched(r["response"], base[(r["item"], r["sample"])]) for r in pairs]
        entry: dict[str, Any] = {
            "pairs": len(pairs),
            "position_flip_rate": stats.mean_estimate(
                [None if f is None else float(f) for f in flipped], indices
            ).to_dict(),
            "win_rate": stats.mean_estimate(wins, indices).to_dict(),
            "win_rate_length_matched": stats.mean_estimate(
                [w if m else None for w, m in zip(wins, matched, strict=True)], indices
            ).to_dict(),
        }
        both = [r for r in pairs if "preference" in (r.get("second_judge") or {})]
        if both:
            first = [r["judge"]["preference"] for r in both]
            second = [r["second_judge"]["preference"] for r in both]
            entry["judges_kappa"] = kappa_estimate(first, second, resamples, seed)
        result[system] = entry
    return result


def kappa_estimate(first: list[str], second: list[str], resamples: int, seed: int) -> dict[str, Any]:
    """Cohen's kappa (scikit-learn) of two judges' outcomes, with a bootstrap interval over the pairs."""
    import numpy as np
    from sklearn.metrics import cohen_kappa_score

    def kappa(a: list[str], b: list[str]) -> float:
        if len(set(a) | set(b)) < 2:
            return 1.0 if a == b else 0.0  # one label everywhere: kappa is undefined; agreement is total
        return float(cohen_kappa_score(a, b))

    indices = stats.resample_indices(len(first), resamples, seed)
    draws = np.asarray([kappa([first[i] for i in row], [second[i] for i in row]) for row in indices])
    low, high = stats.percentile_interval(draws, stats.CONFIDENCE)
    return stats.Estimate(kappa(first, second), low, high, len(first)).to_dict()
