"""Personality by questionnaire: each system is interviewed item by item, answers become 1-5 scores.

A questionnaire is a CSV with a ``text`` column (the statement), a trait column (``label_ocean``, or
``trait`` / ``ocean`` / ``domain``) holding O, C, E, A or N, and a ``key`` column (1, or -1 for a
reverse-keyed item, whose score is flipped: 6 - score). IPIP-style item banks have this shape.
"""

import asyncio
import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persllm.config import TRAITS, Workspace
from persllm.config.llm import LLMConfig
from persllm.config.stages import EvalSettings
from persllm.errors import UserError
from persllm.evaluate.judge import render
from persllm.evaluate.systems import Item as Held
from persllm.evaluate.systems import Request, generate, messages_for, retrieval_context, stage_prompts
from persllm.llm import make_backend
from persllm.prompting import split_inline

if TYPE_CHECKING:
    from persllm.evaluate.systems import System

TRAIT_COLUMNS = ("label_ocean", "trait", "ocean", "domain")


@dataclass(frozen=True)
class Item:
    """One questionnaire statement, its Big Five trait and its key (1 or -1)."""

    text: str
    trait: str
    key: int


BUNDLED = {"bundled:big5-30": Path(__file__).parent / "prompts" / "big_five_30.csv"}


def load_questionnaire(path: str | Path) -> list[Item]:
    """Read and check a questionnaire CSV; every problem is a UserError naming the file and column.

    ``bundled:big5-30`` is persllm's own 30 statements (six per trait, half reverse-keyed).
    """
    path = BUNDLED.get(str(path), Path(path))
    if not path.is_file():
        raise UserError(f"{path}: questionnaire file not found; fix eval.questionnaire")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(
            f"{path}: not a readable UTF-8 CSV ({exc}); save it as CSV with a header row"
        ) from None
    if "text" not in columns:
        raise UserError(f"{path}: column 'text' missing (found: {', '.join(columns) or 'none'}); add it")
    trait_column = next((c for c in TRAIT_COLUMNS if c in columns), None)
    if trait_column is None:
        raise UserError(f"{path}: no trait column; add one named {' or '.join(TRAIT_COLUMNS)} with O/C/E/A/N")
    if "key" not in columns:
        raise UserError(f"{path}: column 'key' missing; add it with 1 (or -1 for reverse-keyed items)")
    items: list[Item] = []
    for line, row in enumerate(rows, start=2):
        trait = row.get(trait_column, "").upper()
        if trait not in TRAITS:
            raise UserError(f"{path}:{line}: column {trait_column!r}: {trait!r} is not one of O, C, E, A, N")
        try:
            key = int(float(row.get("key", "")))
        except ValueError:
            key = 0
        if key not in (1, -1):
            raise UserError(f"{path}:{line}: column 'key': {row.get('key')!r} must be 1 or -1")
        if not row["text"]:
            raise UserError(f"{path}:{line}: column 'text' is empty; write the statement")
        items.append(Item(text=row["text"], trait=trait, key=key))
    if not items:
        raise UserError(f"{path}: no items; add rows under the header")
    return items


def select_items(items: list[Item], limit: int | None) -> list[Item]:
    """At most ``limit`` items, taken round-robin over traits so every trait stays covered."""
    if limit is None or limit >= len(items):
        return list(items)
    by_trait: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_trait[item.trait].append(item)
    chosen: list[Item] = []
    round_ = 0
    while len(chosen) < limit:
        for trait in TRAITS:
            if round_ < len(by_trait[trait]) and len(chosen) < limit:
                chosen.append(by_trait[trait][round_])
        round_ += 1
    return chosen


def interview_question(item: Item) -> str:
    """The interviewer's turn for one statement."""
    return render("interview", text=item.text)


def judge_scoring_prompt(item: Item, answer: str) -> str:
    """The judge's prompt turning an interview answer into a 1-5 rating."""
    return render("judge_personality", text=item.text, answer=answer or "(no answer)")


def parse_rating(text: str) -> int | None:
    """A 1-5 rating from an answer: ``Rating: N`` if present, else the first standalone 1-5 number."""
    marked = re.findall(r"rating\W{0,4}([1-5])\b", text, flags=re.IGNORECASE)
    if marked:
        return int(marked[-1])
    cleaned = re.sub(r"(?:out of|/)\s*5\b", " ", text, flags=re.IGNORECASE)
    match = re.search(r"(?<![\d.])([1-5])(?![\d.]\d|\d)", cleaned)
    return int(match.group(1)) if match else None


def keyed_score(rating: int, key: int) -> int:
    """The trait score of a 1-5 rating: reverse-keyed items count 6 - rating."""
    return 6 - rating if key == -1 else rating


def trait_means(scores: list[tuple[str, int]]) -> dict[str, float]:
    """Mean keyed score per trait, over the ``(trait, score)`` pairs given."""
    sums: dict[str, list[int]] = defaultdict(list)
    for trait, score in scores:
        sums[trait].append(score)
    return {trait: sum(values) / len(values) for trait in TRAITS if (values := sums.get(trait))}


def profile_distance(means: dict[str, float], target: dict[str, float] | None) -> float | None:
    """Mean absolute difference over the traits both profiles have; None when none are shared."""
    shared = [t for t in TRAITS if target and t in target and t in means]
    if not shared or target is None:
        return None
    return sum(abs(means[t] - target[t]) for t in shared) / len(shared)


def interview(
    settings: EvalSettings,
    workspace: Workspace,
    systems: list["System"],
    cache: Any,
    judge: LLMConfig | None,
    skipped: dict[str, str],
    backends: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ask every system the questionnaire as each persona at its latest stage; trait means per system.

    Answers are scored by the judge when one is given, else by the number the model wrote. Returns
    ``{system: {persona: {traits, target, distance, answered, asked}}}``; ``backends`` are reused models.
    """

    cfg = settings.eval
    assert cfg.questionnaire is not None
    path = Path(cfg.questionnaire)
    where = (
        cfg.questionnaire
        if cfg.questionnaire in BUNDLED
        else path
        if path.is_absolute()
        else workspace.root / path
    )
    questions = select_items(load_questionnaire(where), cfg.questionnaire_items)

    # One interview per system x persona, at the persona's latest stage, prompted as in evaluation.
    context = retrieval_context(settings, workspace)
    requests: list[Request] = []
    keys: list[tuple[str, str, Item]] = []
    for system in systems:
        batch: list[Request] = []
        try:
            for persona in workspace.personas.values():
                stage = persona.stages[-1]
                full, brief = stage_prompts(persona, stage)
                for index, question in enumerate(questions):
                    held = Held(
                        id=f"{persona.id}:q{index}",
                        persona=persona.id,
                        stage=stage.id,
                        kind="questionnaire",
                        label=stage.label,
                        system=full,
                        brief=brief,
                        question=interview_question(question),
                        reference="",
                    )
                    batch.append(
                        Request(system, persona.id, stage.id, messages_for(system, held, context), 0, held.id)
                    )
                    keys.append((system.name, persona.id, question))
        except UserError as exc:
            skipped[f"personality/{system.name}"] = str(exc)
            keys = [k for k in keys if k[0] != system.name]
            continue
        requests += batch
    answers = [
        split_inline(c.text)[1]
        for c in generate(settings, workspace, requests, dict(cfg.params), cache, backends)
    ]

    # Scores: the judge's reading of each answer, or the rating the answer states.
    if judge is not None:
        prompts = [judge_scoring_prompt(q, a) for (_, _, q), a in zip(keys, answers, strict=True)]
        ratings = [parse_rating(text) for text in _ask_judge(judge, cache, dict(cfg.judge_params), prompts)]
    else:
        ratings = [parse_rating(answer) for answer in answers]
    collected: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    asked: dict[tuple[str, str], int] = defaultdict(int)
    for (system_name, persona_id, question), rating in zip(keys, ratings, strict=True):
        asked[(system_name, persona_id)] += 1
        if rating is not None:
            collected[(system_name, persona_id)].append((question.trait, keyed_score(rating, question.key)))
    result: dict[str, Any] = defaultdict(dict)
    for (system_name, persona_id), count in asked.items():
        means = trait_means(collected[(system_name, persona_id)])
        target = workspace.persona(persona_id).personality
        result[system_name][persona_id] = {
            "traits": means,
            "target": target,
            "distance": profile_distance(means, target),
            "answered": len(collected[(system_name, persona_id)]),
            "asked": count,
        }
    return dict(result)


def _ask_judge(judge: LLMConfig, cache: Any, params: dict[str, Any], prompts: list[str]) -> list[str]:
    async def ask_all() -> list[str]:
        backend = make_backend(judge, cache)
        try:
            done = await asyncio.gather(
                *(backend.generate([{"role": "user", "content": p}], params) for p in prompts)
            )
        finally:
            await backend.aclose()
        return [c.text for c in done]

    return asyncio.run(ask_all())
