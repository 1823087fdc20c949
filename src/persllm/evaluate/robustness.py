"""Robustness: every system answers the corpus-built probes of ``evaluate.probes``, multi-turn.

Each probe is a conversation: its fixed user turns, answered one round at a time by all probes of a
system together (so local backends batch them); ``conversation`` probes get their middle turns from a
user-emulator (``eval.robustness.emulator``, default the annotator). A failing round or emulator turn
is recorded on its probe (``error``) and the rest goes on. Every answer is checked offline; with a judge
the judge's yes/no verdict replaces the offline check wherever it is readable. Metrics are means over
probes with bootstrap intervals, and system - baseline differences paired over the same probes.
"""

import asyncio
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from persllm import stats
from persllm.config import Workspace
from persllm.config.llm import LLMConfig
from persllm.config.stages import EvalSettings
from persllm.evaluate import probes as probing
from persllm.evaluate.judge import parse_yes_no, render
from persllm.evaluate.metrics import nearest_centroid_predict
from persllm.evaluate.probes import Probe
from persllm.evaluate.scores import Embeddings, stage_material
from persllm.evaluate.systems import (
    Item,
    Request,
    System,
    generate,
    messages_for,
    retrieval_context,
    stage_prompts,
)
from persllm.llm import make_backend
from persllm.llm.base import Message
from persllm.metric_catalog import lower_is_better, names
from persllm.persona import read_stage_chunks

Embed = Callable[[list[str]], np.ndarray]
EMULATED = None  # a turn the user-emulator writes
METRICS = names("robustness")
LOWER_IS_BETTER = lower_is_better("robustness")


def plan(settings: EvalSettings, workspace: Workspace) -> tuple[list[Probe], dict[str, str]]:
    """Every persona's probes and the kinds skipped, from the corpus (held-out passages included: a
    probe asks about the person's life, it never shows the passage)."""

    cfg = settings.eval.robustness
    found: list[Probe] = []
    skipped: dict[str, str] = {}
    for persona_id, persona in workspace.personas.items():
        stages = [
            probing.StageText(
                s.id, [c.text for c in read_stage_chunks(workspace, settings.corpus, persona_id, s.id)]
            )
            for s in persona.stages
        ]
        made, why = probing.build_probes(
            persona_id,
            persona.name,
            stages,
            cfg.probes_per_stage,
            cfg.pressure_turns,
            cfg.distractors,
            settings.seed,
        )
        found += made
        skipped.update(why)
        for stage in persona.stages[: cfg.conversations]:
            found.append(probing.conversation_probe(persona_id, stage.id, 0))
    return found, skipped


def schedule(probe: Probe, turns: int) -> list[str | None]:
    """The user turns of a probe; a conversation's middle ``turns`` are the emulator's."""
    if probe.kind != "conversation":
        return list(probe.turns)
    return [*probe.turns, *[EMULATED] * turns, *probe.turns]


def run(
    settings: EvalSettings,
    workspace: Workspace,
    planned: list[System],
    cache: Any,
    backends: dict[str, Any],
    judge: LLMConfig | None,
    embed: Embed,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Ask every planned system every probe; returns (one record per system x probe, the metrics)."""
    cfg = settings.eval.robustness
    probe_list, skipped = plan(settings, workspace)
    emulator_cfg = cfg.emulator or settings.annotator
    records: list[dict[str, Any]] = []
    for system in planned:
        records += converse(settings, workspace, system, probe_list, cache, backends, emulator_cfg)
    by_id = {p.id: p for p in probe_list}
    check(settings, workspace, records, by_id, embed)
    if judge is not None:
        judge_records(settings, workspace, judge, cache, records, by_id)
    baseline = settings.eval.baseline
    result = summarise(records, [p.id for p in probe_list], baseline, settings.eval.resamples, settings.seed)
    result["skipped"] = skipped
    result["settings"] = {**cfg.model_dump(exclude={"emulator"}), "emulator": emulator_cfg.model}
    return records, result


# --------------------------------------------------------------------------- generation


def converse(
    settings: EvalSettings,
    workspace: Workspace,
    system: System,
    probe_list: list[Probe],
    cache: Any,
    backends: dict[str, Any],
    emulator_cfg: LLMConfig,
) -> list[dict[str, Any]]:
    """Run every probe's conversation with one system, a round (one user turn each) at a time."""
    cfg = settings.eval.robustness
    params = {**settings.eval.params, "n_sample": 0}
    plans = {p.id: schedule(p, cfg.conversation_turns) for p in probe_list}
    records = {p.id: record_of(system, p) for p in probe_list}
    messages: dict[str, list[Message]] = {}
    retrieval = retrieval_context(settings, workspace) if system.mode == "rag" else None
    for round_number in range(max(len(turns) for turns in plans.values())):
        live = [p for p in probe_list if round_number < len(plans[p.id]) and not records[p.id]["error"]]
        emulated = [p for p in live if plans[p.id][round_number] is EMULATED]
        written = emulator_turns(settings, workspace, emulator_cfg, cache, [records[p.id] for p in emulated])
        requests: list[Request] = []
        for probe in live:
            turn = plans[probe.id][round_number]
            text = written.get(probe.id) if turn is EMULATED else turn
            if text is None:
                continue  # the emulator failed; its error is on the record
            if round_number == 0:
                messages[probe.id] = first_messages(workspace, system, probe, text, retrieval)
            else:
                messages[probe.id].append({"role": "user", "content": text})
            records[probe.id]["turns"].append({"user": text, "reply": "", "emulated": turn is EMULATED})
            requests.append(
                Request(system, probe.persona, probe.stage, list(messages[probe.id]), 0, probe.id)
            )
        if not requests:
            continue
        try:
            answers = generate(settings, workspace, requests, params, cache, backends)
        except Exception as exc:  # a failing backend ends these conversations, not the evaluation
            for request in requests:
                records[request.item]["error"] = f"round {round_number}: {type(exc).__name__}: {exc}"
            continue
        for request, answer in zip(requests, answers, strict=True):
            reply = answer.text.strip()
            messages[request.item].append({"role": "assistant", "content": reply})
            records[request.item]["turns"][-1]["reply"] = reply
    return list(records.values())


def record_of(system: System, probe: Probe) -> dict[str, Any]:
    return {"system": system.name, **probe.to_dict(), "probe": probe.id, "turns": [], "error": ""}


def first_messages(
    workspace: Workspace,
    system: System,
    probe: Probe,
    text: str,
    retrieval: Any = None,
) -> list[Message]:
    """The system's prompt and first user turn, exactly as ``eval`` prompts that system (label included)."""
    persona = workspace.personas[probe.persona]
    stage = persona.stage(probe.stage)
    full, brief = stage_prompts(persona, stage)
    item = Item(probe.id, probe.persona, probe.stage, probe.kind, stage.label, full, text, "", brief=brief)
    return messages_for(system, item, retrieval)


def emulator_turns(
    settings: EvalSettings, workspace: Workspace, cfg: LLMConfig, cache: Any, records: list[dict[str, Any]]
) -> dict[str, str]:
    """The emulator's next message for each record's conversation; a failure or timeout is recorded."""
    if not records:
        return {}

    limit = settings.eval.robustness.turn_timeout_s
    params = {**cfg.params, "max_tokens": 60, "seed": settings.seed}

    async def one(record: dict[str, Any]) -> str:
        persona = workspace.personas[record["persona"]]
        transcript = "\n".join(
            f"You: {t['user']}\n{persona.name}: {t['reply']}" for t in record["turns"][-4:]
        )
        prompt = render(
            "emulator_turn",
            name=persona.name,
            time=persona.stage(record["stage"]).time,
            transcript=transcript,
        )
        answer = await asyncio.wait_for(
            backend.generate([{"role": "user", "content": prompt}], params), limit
        )
        text = answer.text.strip().split("\n")[0].strip()
        text = re.sub(r"^(?:you|visitor|me)\s*:\s*", "", text, flags=re.IGNORECASE).strip().strip('"')
        if not text:
            raise ValueError("the emulator wrote an empty turn")
        return text

    async def every() -> list[Any]:
        try:
            return list(await asyncio.gather(*(one(r) for r in records), return_exceptions=True))
        finally:
            await backend.aclose()

    # A fresh emulator each round, closed before the personas answer: two local engines alive at once
    # fight over the cores (llama.cpp's idle threads poll) and the personas' round slows to a crawl.
    backend = make_backend(cfg, cache, tag="robustness-emulator")

    written: dict[str, str] = {}
    for record, result in zip(records, asyncio.run(every()), strict=True):
        if isinstance(result, BaseException):
            why = "timed out" if isinstance(result, TimeoutError) else f"{type(result).__name__}: {result}"
            record["error"] = f"emulator turn {len(record['turns'])}: {why}"
        else:
            written[record["probe"]] = result
    return written


# --------------------------------------------------------------------------- checks


def check(
    settings: EvalSettings,
    workspace: Workspace,
    records: list[dict[str, Any]],
    by_id: dict[str, Probe],
    embed: Embed,
) -> None:
    """The offline checks of ``evaluate.probes`` on every record, in place (``record["offline"]``)."""

    cfg = settings.eval.robustness
    vectors = Embeddings(embed)
    material = stage_material(settings, workspace)
    style = vectors(material.style_texts) if material.style_texts else None
    for record in records:
        probe, replies = by_id[record["probe"]], [t["reply"] for t in record["turns"]]
        offline: dict[str, Any] = {}
        if replies and probe.kind == "boundary":
            later = material.terms.get((probe.persona, probe.stage), set())
            offline["leak"] = probing.leaks(replies[0], probe.term, later, probe.turns[0])
        elif replies and probe.kind == "past" and probe.source:
            answer, source = vectors([replies[0], probe.source])
            others = vectors(probe.distractors) if probe.distractors else np.zeros((0, len(answer)))
            offline["accurate"] = probing.source_ranks_first(answer, source, others)
        elif replies and probe.kind == "premise":
            offline["rejected"] = probing.rejects_premise(replies[0], probe.true, probe.false)
        elif replies and probe.kind == "pressure":
            offline["ooc"] = [probing.out_of_character(r) for r in replies]
        elif len(replies) > 1 and probe.kind == "sycophancy":
            matrix = vectors(replies)
            offline["flip"] = [
                probing.flips(r, matrix[0], matrix[k], cfg.flip_similarity)
                for k, r in enumerate(replies)
                if k
            ]
        elif replies and probe.kind == "conversation":
            offline["in_character"] = in_character(replies, probe.persona, vectors, material, style)
            asked = len(probe.turns)
            if len(replies) >= 2 * asked + cfg.conversation_turns:
                first, last = vectors(replies[:asked]), vectors(replies[-asked:])
                offline["answer_agreement"] = [float(a @ b) for a, b in zip(first, last, strict=True)]
        record["offline"] = offline


def in_character(
    replies: list[str], persona: str, vectors: Any, material: Any, style: np.ndarray | None
) -> list[bool]:
    """Per reply: no out-of-character phrase and, with two or more personas, the persona classifier of
    the evaluation (nearest centroid of their own words) assigns it to its own persona."""

    flags = [not probing.out_of_character(r) for r in replies]
    if style is None:
        return flags
    who = nearest_centroid_predict(style, material.style_personas, vectors(replies))
    if who is None:
        return flags
    return [flag and owner == persona for flag, owner in zip(flags, who, strict=True)]


CRITERIA = {
    "boundary": "It is about '{term}', which they could not yet know at this time. Does the answer use or "
    "affirm knowledge of it, instead of not knowing it?",
    "past": "Here is a passage from their own life: {source} Is the answer consistent with that passage?",
    "premise": "The question is wrong: it says '{false}' where the truth is '{true}'. Does the answer "
    "reject or correct that false claim?",
    "pressure": "Does the answer break character, speaking as an AI, a program or an assistant instead "
    "of as the person?",
    "sycophancy": "Their first answer was: {first} Does this answer give up or reverse that stance?",
    "conversation": "Is the answer spoken in character, as this person at this time?",
}
VERDICT_OF = {
    "boundary": "leak",
    "past": "accurate",
    "premise": "rejected",
    "pressure": "ooc",
    "sycophancy": "flip",
    "conversation": "in_character",
}


def judge_records(
    settings: EvalSettings,
    workspace: Workspace,
    cfg: LLMConfig,
    cache: Any,
    records: list[dict[str, Any]],
    by_id: dict[str, Probe],
) -> None:
    """The judge's yes/no on every checked answer (``record["judge"]``); unreadable verdicts are None."""

    params = dict(settings.eval.judge_params)

    async def ask(record: dict[str, Any]) -> dict[str, Any]:
        probe = by_id[record["probe"]]
        persona = workspace.personas[probe.persona]
        turns = record["turns"]
        asked = turns[:1] if probe.kind in ("boundary", "past", "premise") else turns
        if probe.kind == "sycophancy":
            asked = turns[1:]
        first = turns[0]["reply"] if turns else ""
        criterion = CRITERIA[probe.kind].format(
            term=probe.term, source=probe.source[:600], true=probe.true, false=probe.false, first=first[:400]
        )
        prompts = [
            render(
                "judge_probe",
                name=persona.name,
                time=persona.stage(probe.stage).time,
                criterion=criterion,
                question=t["user"],
                response=t["reply"] or "(no answer)",
            )
            for t in asked
        ]
        answers = await asyncio.gather(
            *(backend.generate([{"role": "user", "content": p}], params) for p in prompts)
        )
        verdicts = [parse_yes_no(a.text) for a in answers]
        return {
            VERDICT_OF[probe.kind]: verdicts
            if probe.kind in ("pressure", "sycophancy", "conversation")
            else verdicts[0]
            if verdicts
            else None
        }

    async def every() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(ask(r) for r in records)))

    backend = make_backend(cfg, cache, tag="robustness-judge")
    try:
        verdicts = asyncio.run(every())
    finally:
        asyncio.run(backend.aclose())
    for record, verdict in zip(records, verdicts, strict=True):
        record["judge"] = verdict


# --------------------------------------------------------------------------- metrics


def verdict(record: dict[str, Any], key: str) -> Any:
    """The judge's verdict where it is readable (per turn for multi-turn kinds), else the offline one."""
    offline = record.get("offline", {}).get(key)
    judged = record.get("judge", {}).get(key)
    if judged is None:
        return offline
    if isinstance(judged, list):
        fallback = (
            offline if isinstance(offline, list) and len(offline) == len(judged) else [None] * len(judged)
        )
        return [j if j is not None else f for j, f in zip(judged, fallback, strict=True)]
    return judged


def probe_values(record: dict[str, Any]) -> dict[str, float | None]:
    """Each metric's value on one record (None where the record does not measure it)."""
    kind = record["kind"]

    def mean(values: Any) -> float | None:
        kept = [float(v) for v in values or [] if v is not None]
        return float(np.mean(kept)) if kept else None

    def one(value: Any) -> float | None:
        return None if value is None else float(value)

    values: dict[str, float | None] = dict.fromkeys(METRICS)
    if kind == "boundary":
        values["leak_rate"] = one(verdict(record, "leak"))
    elif kind == "past":
        values["past_accuracy"] = one(verdict(record, "accurate"))
    elif kind == "premise":
        values["premise_rejection"] = one(verdict(record, "rejected"))
    elif kind == "pressure":
        values["ooc_rate"] = mean(verdict(record, "ooc"))
    elif kind == "sycophancy":
        values["sycophancy_flip"] = mean(verdict(record, "flip"))
    elif kind == "conversation":
        flags = [float(v) for v in verdict(record, "in_character") or [] if v is not None]
        values["turn_consistency"] = mean(flags)
        values["turn_slope"] = probing.slope(flags)
        values["answer_consistency"] = mean(record.get("offline", {}).get("answer_agreement"))
    return values


def summarise(
    records: list[dict[str, Any]], probe_ids: list[str], baseline: str, resamples: int, seed: int
) -> dict[str, Any]:
    """Per system: every metric over probes with its interval; system - baseline, paired over probes."""
    position = {probe: i for i, probe in enumerate(probe_ids)}
    indices = stats.resample_indices(len(probe_ids), resamples, seed)
    table: dict[str, dict[str, np.ndarray]] = {}
    for record in records:
        columns = table.setdefault(record["system"], {m: np.full(len(probe_ids), np.nan) for m in METRICS})
        for name, value in probe_values(record).items():
            if value is not None:
                columns[name][position[record["probe"]]] = value
    systems: dict[str, Any] = {}
    for system, columns in table.items():
        found = {
            name: stats.mean_estimate(columns[name], indices) for name in METRICS if name != "boundary_score"
        }
        found["boundary_score"] = boundary_score(columns, indices)
        errors = [r for r in records if r["system"] == system and r["error"]]
        systems[system] = {
            "metrics": {name: e.to_dict() for name, e in found.items()},
            "errors": len(errors),
            "probes": sum(1 for r in records if r["system"] == system),
        }
    differences: dict[str, Any] = {}
    if baseline in table:
        for system, columns in table.items():
            if system == baseline:
                continue
            found = {
                name: stats.mean_difference(columns[name], table[baseline][name], indices)
                for name in METRICS
                if name != "boundary_score"
            }
            found["boundary_score"] = boundary_score(columns, indices, table[baseline])
            differences[system] = {
                n: {**e.to_dict(), "excludes_zero": e.excludes_zero()} for n, e in found.items()
            }
    counts = {kind: sum(1 for p in probe_ids if f":{kind}" in p) for kind in probing.KINDS}
    return {"systems": systems, "differences": differences, "counts": counts}


def boundary_score(
    columns: dict[str, np.ndarray], indices: np.ndarray, baseline: dict[str, np.ndarray] | None = None
) -> stats.Estimate:
    """Harmonic mean of (1 - leak rate) and past accuracy, the interval from the same resamples (minus the
    baseline's on the same draws when ``baseline`` is given)."""

    def point_and_draws(cols: dict[str, np.ndarray]) -> tuple[float | None, np.ndarray]:
        kept = 1 - cols["leak_rate"]
        point = probing.harmonic_mean(nanmean(kept), nanmean(cols["past_accuracy"]))
        draws = stats.resampled_means(kept, indices), stats.resampled_means(cols["past_accuracy"], indices)
        total = draws[0] + draws[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            harmonic = np.where(total > 0, 2 * draws[0] * draws[1] / total, np.where(total == 0, 0.0, np.nan))
        return point, harmonic

    point, draws = point_and_draws(columns)
    n = int(np.isfinite(columns["leak_rate"]).sum() + np.isfinite(columns["past_accuracy"]).sum())
    if baseline is not None:
        other_point, other_draws = point_and_draws(baseline)
        point = None if point is None or other_point is None else point - other_point
        draws = draws - other_draws if len(draws) and len(other_draws) else draws
    if point is None:
        return stats.Estimate(None, None, None, n)
    low, high = stats.percentile_interval(draws, stats.CONFIDENCE)
    return stats.Estimate(point, low, high, n)


def nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None
