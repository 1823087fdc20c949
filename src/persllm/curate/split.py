"""The seeded, stratified train/test split and the training mix (repetition + general instruction data)."""

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from persllm.errors import UserError

ROLES = ("system", "user", "assistant")


def stratum(record: dict[str, Any]) -> tuple[str, str, str]:
    return (record["persona"], record["stage"], record.get("kind", "ordinary"))


def held_out_count(n: int, fraction: float) -> int:
    """Held-out records of a stratum of ``n``: about ``n * fraction``, at least one when n >= 2, never all."""
    if n < 2 or fraction <= 0:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


def split_records(
    records: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test): each persona x stage x kind stratum shuffled with its own seed and cut.

    The result depends only on the records' ids and the seed, not on their order in the input.
    """
    strata: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        strata[stratum(record)].append(record)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for key in sorted(strata):
        items = sorted(strata[key], key=lambda r: r["id"])
        random.Random("/".join([str(seed), *key])).shuffle(items)
        n_test = held_out_count(len(items), fraction)
        test += items[:n_test]
        train += items[n_test:]
    return train, test


def read_general(path: Path) -> list[dict[str, Any]]:
    """General instruction data: one ``{"messages": [...]}`` per line; a bad line is a UserError."""
    if not path.is_file():
        raise UserError(
            f"curate.general_data: {path}: file not found; fix the path (relative to persllm.yaml)"
        )
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg}); fix or delete that line") from None
        problem = general_problem(obj)
        if problem:
            raise UserError(
                f'{where}: {problem}; each line must be {{"messages": [{{"role", "content"}}, ...]}}'
            )
        rows.append({"messages": obj["messages"], "meta": general_meta(number)})
    if not rows:
        raise UserError(f"curate.general_data: {path}: no records; add lines or remove the setting")
    return rows


def general_problem(obj: Any) -> str | None:
    """What is wrong with one line of general data, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        return "expected an object with a non-empty `messages` list"
    for index, message in enumerate(obj["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{index}]: role must be one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"messages[{index}]: content must be a non-empty string"
    if not any(m["role"] == "assistant" for m in obj["messages"]):
        return "no assistant message to learn from"
    return None


def general_meta(line: int) -> dict[str, Any]:
    return {"id": f"general:{line}", "persona": None, "stage": None, "kind": "general", "label": None}


def sample_general(general: list[dict[str, Any]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` rows of ``general``: without replacement while it lasts, then whole extra passes."""
    chosen: list[dict[str, Any]] = []
    while len(chosen) < n:
        take = min(n - len(chosen), len(general))
        chosen += rng.sample(general, take)
    return chosen


def training_mix(
    rows: list[dict[str, Any]],
    repeat: int,
    general: list[dict[str, Any]],
    ratio: float,
    seed: int,
    persona: str,
) -> tuple[list[dict[str, Any]], int]:
    """The shuffled training rows: personified rows ``repeat`` times plus ``ratio`` general rows for each.

    Returns the rows and how many of them are general.
    """
    rng = random.Random(f"{seed}/{persona}/mix")
    personified = [row for row in rows for _ in range(repeat)]
    extra = sample_general(general, round(ratio * len(personified)), rng) if general else []
    mixed = personified + extra
    rng.shuffle(mixed)
    return mixed, len(extra)
