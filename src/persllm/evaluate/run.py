"""``persllm eval``: the held-out split answered by every system, scored, judged, and written up.

``run`` writes ``<run_dir>/eval/``: ``generations.jsonl`` (one row per system x item x sample),
``metrics.json``, ``report.md``, ``report.html`` and ``plots/``. ``report.run`` rebuilds the report
from those two files alone. ``run`` reads top to bottom in its phases: inputs, prompts, answers,
judge, metrics, outputs.
"""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from persllm.config import Workspace
from persllm.config.stages import EvalSettings
from persllm.errors import UserError
from persllm.evaluate import judge as judging
from persllm.evaluate import likelihood, personality, report, robustness, scores
from persllm.evaluate.metrics import DEFINITIONS
from persllm.evaluate.systems import (
    Item,
    Request,
    System,
    close,
    generate,
    load_heldout_items,
    load_items,
    messages_for,
    plan_systems,
    retrieval_context,
)
from persllm.index.encoder import embed
from persllm.jsonl import write_jsonl
from persllm.layout import write_json_atomic
from persllm.llm.cache import open_cache
from persllm.manifest import record_stage
from persllm.prompting import split_inline
from persllm.train import card

if TYPE_CHECKING:
    from persllm.config.llm import LLMConfig


@dataclass
class Inputs:
    """What the evaluation works on: the systems that can run, the items, the judge."""

    planned: list[System]
    skipped: dict[str, str]
    golden: list[Item]
    heldout: list[Item]
    passages: list[Item]  # the held-out passages the likelihood scores (its own cap)
    judge: "LLMConfig | None"

    @property
    def items(self) -> list[Item]:
        return self.golden + self.heldout


@dataclass
class Answers:
    """What the systems produced: answers, likelihoods, questionnaire traits, robustness probes."""

    rows: list[dict[str, Any]]
    fidelity: dict[str, Any]
    traits: dict[str, Any]
    probe_records: list[dict[str, Any]]
    robust: dict[str, Any]


@dataclass
class Laps:
    """Seconds per part of the evaluation, for metrics.json."""

    seconds: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.monotonic)

    def lap(self, part: str) -> None:
        self.seconds[part] = round(time.monotonic() - self.clock, 1)
        self.clock = time.monotonic()


def run(
    settings: EvalSettings,
    workspace: Workspace,
    systems: list[str] | None = None,
    judge: "LLMConfig | str | None" = None,
    max_items: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``systems`` (default ``eval.systems``) on every persona x stage; returns metrics.json's data.

    Args:
        settings: the sections the evaluation reads (``EvalSettings.of(project.config)``).
        workspace: the project's personas and run folder (``project.workspace``).
        systems: system names (prompt, rag, sft, sft+dpo, extra systems); missing models are skipped.
        judge: a judge config, model name, URL or ``MODEL@URL`` replacing ``eval.judge``.
        max_items: held-out items per persona x stage (default ``eval.max_items``, else all).
    """
    started = time.monotonic()

    # ---------------------------------------------------------------- inputs
    inputs = gather_inputs(settings, workspace, systems, judge, max_items)
    record_stage(workspace, "eval", status="running", systems=[s.name for s in inputs.planned])

    # ---------------------------------------------------------------- prompts
    context = retrieval_context(settings, workspace)
    requests = build_requests(settings, inputs, context)

    # ---------------------------------------------------------------- answers, likelihood, probes
    laps = Laps()
    answers = answer(settings, workspace, inputs, requests, context, laps)

    # ---------------------------------------------------------------- judge
    judge_validity = judge_answers(settings, workspace, inputs, answers.rows)
    laps.lap("judge")

    # ---------------------------------------------------------------- metrics
    scored = scores.score(
        settings,
        workspace,
        answers.rows,
        encoder_of(settings),
        settings.eval.baseline,
        settings.eval.resamples,
    )
    laps.lap("scoring")

    # ---------------------------------------------------------------- outputs
    result = metrics_of(settings, inputs, answers, scored, judge_validity, laps.seconds, max_items)
    write_outputs(workspace, inputs, answers, result)
    record_done(settings, workspace, inputs, result, time.monotonic() - started)
    return result


def gather_inputs(
    settings: EvalSettings,
    workspace: Workspace,
    systems: list[str] | None,
    judge: "LLMConfig | str | None",
    max_items: int | None,
) -> Inputs:
    """The systems that can run, the annotator-golden and held-out items, the judge; why anything is
    skipped."""
    cfg = settings.eval
    planned, skipped = plan_systems(settings, workspace, systems or cfg.systems)
    inputs = Inputs(
        planned=planned,
        skipped=skipped,
        golden=load_items(settings, workspace, max_items or cfg.max_items),
        heldout=load_heldout_items(workspace, max_items or cfg.heldout_items),
        passages=load_heldout_items(workspace, cfg.likelihood.max_items),
        judge=judging.resolve_judge(cfg.judge, judge),
    )
    if not inputs.items:
        raise UserError(
            f"{workspace.layout.data}: no evaluation items (sft_test.jsonl or held-out questions); "
            "run `persllm annotate` and `persllm curate` first"
        )
    for persona_id in sorted(set(workspace.personas) - {item.persona for item in inputs.golden}):
        skipped[f"persona {persona_id} (annotator-golden)"] = no_golden_reason(
            settings, workspace, persona_id
        )
    for persona_id in sorted(set(workspace.personas) - {item.persona for item in inputs.heldout}):
        skipped[f"persona {persona_id} (held-out)"] = (
            "no held-out own words with questions: set holdout.share above 0 and annotate.heldout_questions"
        )
    return inputs


def build_requests(settings: EvalSettings, inputs: Inputs, context: Any) -> list[Request]:
    """Every system's prompt for every item and sample; a system whose prompts cannot be built (rag with
    no index) is skipped with the reason."""
    requests: list[Request] = []
    for system in list(inputs.planned):
        try:
            conversations = [messages_for(system, item, context) for item in inputs.items]
        except UserError as exc:
            inputs.skipped[system.name] = str(exc)
            inputs.planned.remove(system)
            continue
        for item, messages in zip(inputs.items, conversations, strict=True):
            requests += [
                Request(system, item.persona, item.stage, messages, k, item.id)
                for k in range(settings.eval.samples)
            ]
    if not inputs.planned:
        reasons = "; ".join(f"{k}: {v}" for k, v in inputs.skipped.items())
        raise UserError(f"eval.systems: no system can run ({reasons})")
    return requests


def encoder_of(settings: EvalSettings) -> Callable[[list[str]], Any]:
    def encode(texts: list[str]) -> Any:
        return embed(texts, settings.embedder)

    return encode


def answer(
    settings: EvalSettings,
    workspace: Workspace,
    inputs: Inputs,
    requests: list[Request],
    context: Any,
    laps: Laps,
) -> Answers:
    """Generation, then the likelihood, the questionnaire and the robustness probes with the models still
    loaded; the ``<think>`` analysis is split off every answer."""
    cfg = settings.eval
    cache = open_cache(workspace)
    backends: dict[str, Any] = {}
    names = ", ".join(system.name for system in inputs.planned)
    print(
        f"eval: {len(requests)} answers from {names} on {len(inputs.items)} items",
        file=sys.stderr,
        flush=True,
    )
    planned, skipped = inputs.planned, inputs.skipped
    try:
        completions = generate(settings, workspace, requests, dict(cfg.params), cache, backends)
        laps.lap("generation")
        fidelity = likelihood.run(settings, workspace, planned, inputs.passages, context, backends, skipped)
        laps.lap("likelihood")
        traits = (
            personality.interview(settings, workspace, planned, cache, inputs.judge, skipped, backends)
            if cfg.questionnaire
            else {}
        )
        laps.lap("questionnaire")
        probe_records, robust = (
            robustness.run(settings, workspace, planned, cache, backends, inputs.judge, encoder_of(settings))
            if cfg.robustness.enabled
            else ([], {})
        )
        laps.lap("robustness")
    finally:
        close(backends)
    by_id = {item.id: item for item in inputs.items}
    rows = [
        row_of(r, by_id[r.item], c, split_inline(c.text)) for r, c in zip(requests, completions, strict=True)
    ]
    return Answers(rows, fidelity, traits, probe_records, robust)


def judge_answers(
    settings: EvalSettings, workspace: Workspace, inputs: Inputs, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The judge's own accuracy at telling the real passage from decoys first, then its agreement, false
    premises and two-order preference against the baseline (written into ``rows``)."""
    cfg = settings.eval
    if inputs.judge is None:
        if cfg.second_judge is not None:
            inputs.skipped["second_judge"] = (
                "eval.second_judge needs eval.judge (agreement is between two judges)"
            )
        return {}
    cache = open_cache(workspace)
    params = dict(cfg.judge_params)
    personas = {f"{p.id}/{s.id}": (p.name, s.time) for p in workspace.personas.values() for s in p.stages}
    baseline = cfg.baseline if any(s.name == cfg.baseline for s in inputs.planned) else None
    if baseline is None:
        inputs.skipped.setdefault(
            "preference", f"baseline {cfg.baseline!r} did not run; no pairwise preference"
        )
    validity = judging.validity(
        inputs.judge,
        cache,
        params,
        likelihood.plan(workspace, inputs.passages, list(cfg.likelihood.decoys), settings.seed),
        personas,
        cfg.resamples,
        settings.seed,
    )
    judging.judge_all(inputs.judge, cache, params, rows, baseline, personas)
    if cfg.second_judge is not None:
        judging.judge_all(cfg.second_judge, cache, params, rows, baseline, personas, key="second_judge")
    return validity


def metrics_of(
    settings: EvalSettings,
    inputs: Inputs,
    answers: Answers,
    scored: dict[str, Any],
    judge_validity: dict[str, Any],
    seconds: dict[str, float],
    max_items: int | None,
) -> dict[str, Any]:
    """The contents of ``metrics.json``."""
    cfg = settings.eval
    judge_cfg = inputs.judge
    return {
        "definitions": DEFINITIONS,
        "settings": {
            "systems": [s.name for s in inputs.planned],
            "skipped": inputs.skipped,
            "samples": cfg.samples,
            "params": dict(cfg.params),
            "max_items": max_items or cfg.max_items,
            "base_model": settings.base_model.model,
            "generation_backend": settings.base_model.backend,
            "judge": judge_cfg.model if judge_cfg else None,
            "judge_params": dict(cfg.judge_params) if judge_cfg else None,
            "second_judge": cfg.second_judge.model if cfg.second_judge and judge_cfg else None,
            "baseline": cfg.baseline,
            "embedder": settings.embedder.model,
            "seed": settings.seed,
            "resamples": cfg.resamples,
            "confidence": 0.95,
        },
        "seconds": seconds,
        "counts": {
            "items": len(inputs.items),
            "golden_items": len(inputs.golden),
            "heldout_items": len(inputs.heldout),
            "heldout_exchanges": sum(item.source == "exchange" for item in inputs.heldout),
            "generations": len(answers.rows),
        },
        "systems": scored["systems"],
        "differences": scored["differences"],
        "reference": scored["reference"],
        "personality": answers.traits,
        "judging": judging.hygiene(answers.rows, cfg.baseline, cfg.resamples, settings.seed)
        if judge_cfg
        else {},
        "judge_validity": judge_validity,
        "likelihood": answers.fidelity,
        "robustness": answers.robust,
    }


def write_outputs(workspace: Workspace, inputs: Inputs, answers: Answers, result: dict[str, Any]) -> None:
    """Generations, probes, metrics and the report; each trained folder's card gets its headline."""
    layout = workspace.layout
    write_jsonl(layout.generations, answers.rows)
    write_jsonl(layout.robustness, answers.probe_records)
    write_json_atomic(layout.metrics, result)
    report.write_report(layout.eval, result, answers.rows)
    for system in inputs.planned:
        if system.mode == "trained":
            for persona_id, folder in system.adapters.items():
                card.write_evaluation(folder, card.evaluation_lines(result, system.name, persona_id))


def record_done(
    settings: EvalSettings, workspace: Workspace, inputs: Inputs, result: dict[str, Any], seconds: float
) -> None:
    """The manifest's record of the finished evaluation (written last)."""
    cfg = settings.eval
    judge_cfg = inputs.judge
    record_stage(
        workspace,
        "eval",
        status="done",
        seconds=round(seconds, 3),
        systems=[s.name for s in inputs.planned],
        skipped=inputs.skipped,
        counts=result["counts"],
        judge=judge_cfg.model_dump(mode="json") if judge_cfg else None,
        judge_params=dict(cfg.judge_params) if judge_cfg else None,
        second_judge=cfg.second_judge.model_dump(mode="json") if cfg.second_judge and judge_cfg else None,
    )


def no_golden_reason(settings: EvalSettings, workspace: Workspace, persona_id: str) -> str:
    """Why a persona has no annotator-golden items: nothing annotator-written was planned, the test share
    is 0, or the test file is empty for another reason."""
    annotate = settings.annotate
    shares = annotate.own_words_shares(settings.annotator.model)
    written = {
        kind: count
        for kind, count in annotate.counts.model_dump().items()
        if count and (kind == "misleading" or shares.get(kind, 0.0) < 1.0)
    }
    if not written:
        return (
            "the annotation plans no annotator-written dialogues (annotate.counts and own_words_share give "
            "every reply from the person's own words), so there is no annotator-golden set; the held-out "
            "own words are the evaluation"
        )
    if settings.curate.test_fraction == 0:
        return "curate.test_fraction is 0: no annotator-written dialogue is held out for testing"
    test = workspace.layout.sft_test(persona_id)
    return f"{test} is empty: too few annotator-written dialogues to hold one out"


def row_of(request: Any, item: Any, completion: Any, split: tuple[str, str]) -> dict[str, Any]:
    """One line of ``generations.jsonl``: which system answered which item, and what it wrote."""
    return {
        "system": request.system.name,
        "persona": item.persona,
        "stage": item.stage,
        "kind": item.kind,
        "set": item.set,
        "item": item.id,
        "sample": request.sample,
        "question": item.question,
        "reference": item.reference,
        "output": completion.text,
        "analysis": split[0],
        "response": split[1],
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "cached": completion.cached,
    }
