"""Evaluation: the held-out split answered by every system, scored, judged, and written up.

``run`` writes ``<run_dir>/eval/``: ``generations.jsonl`` (one row per system x item x sample),
``metrics.json``, ``report.md``, ``report.html`` and ``plots/``. ``report.run`` rebuilds the report
from those two files alone. Heavy libraries are imported inside ``run`` so loading a config stays fast.
"""

import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from persllm.config import Project
    from persllm.llm.config import LLMConfig

__all__ = ["run"]


def run(
    project: "Project",
    systems: list[str] | None = None,
    judge: "LLMConfig | str | None" = None,
    max_items: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``systems`` (default ``eval.systems``) on every persona x stage; returns metrics.json's data.

    Args:
        project: the loaded project.
        systems: system names (prompt, rag, sft, sft+dpo, extra systems); missing models are skipped.
        judge: a judge config, model name, URL or ``MODEL@URL`` replacing ``eval.judge``.
        max_items: held-out items per persona x stage (default ``eval.max_items``, else all).
    """
    from persllm.cot import split_inline
    from persllm.errors import UserError
    from persllm.evaluate import judge as judging
    from persllm.evaluate import likelihood, personality, report, robustness, scores
    from persllm.evaluate.metrics import DEFINITIONS
    from persllm.evaluate.systems import (
        Request,
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
    from persllm.train import card

    cfg = project.config.eval
    started = time.monotonic()
    out = project.layout.eval

    # Inputs: the systems that can run, held-out items, the judge.
    planned, skipped = plan_systems(project, systems or cfg.systems)
    golden = load_items(project, max_items or cfg.max_items)
    heldout = load_heldout_items(project, max_items or cfg.heldout_items)
    passages = load_heldout_items(project, cfg.likelihood.max_items)  # scored by likelihood, own cap
    items = golden + heldout
    if not items:
        raise UserError(
            f"{project.layout.data}: no evaluation items (sft_test.jsonl or held-out questions); "
            "run `persllm annotate` and `persllm curate` first"
        )
    for persona_id in sorted(set(project.personas) - {item.persona for item in golden}):
        skipped[f"persona {persona_id} (annotator-golden)"] = no_golden_reason(project, persona_id)
    for persona_id in sorted(set(project.personas) - {item.persona for item in heldout}):
        skipped[f"persona {persona_id} (held-out)"] = (
            "no held-out own words with questions: set holdout.share above 0 and annotate.heldout_questions"
        )
    judge_cfg = judging.resolve_judge(cfg.judge, judge)
    record_stage(project, "eval", status="running", systems=[s.name for s in planned])

    # Prompts: rag falls back to re-retrieval, and is skipped when there is no index either.
    context = retrieval_context(project)
    requests: list[Request] = []
    for system in list(planned):
        try:
            conversations = [messages_for(system, item, context) for item in items]
        except UserError as exc:
            skipped[system.name] = str(exc)
            planned.remove(system)
            continue
        for item, messages in zip(items, conversations, strict=True):
            requests += [
                Request(system, item.persona, item.stage, messages, k, item.id) for k in range(cfg.samples)
            ]
    if not planned:
        raise UserError(
            "eval.systems: no system can run (" + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ")"
        )

    def encode(texts: list[str]) -> Any:
        return embed(texts, project.config.embedder)

    # Generation, then the questionnaire and the robustness probes with the models still loaded;
    # the <think> analysis is split off.
    cache = open_cache(project)
    params = dict(cfg.params)
    backends: dict[str, Any] = {}
    names = ", ".join(system.name for system in planned)
    print(f"eval: {len(requests)} answers from {names} on {len(items)} items", file=sys.stderr, flush=True)
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(part: str) -> None:
        nonlocal clock
        timings[part] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    try:
        completions = generate(project, requests, params, cache, backends)
        lap("generation")
        fidelity = likelihood.run(project, planned, passages, context, backends, skipped)
        lap("likelihood")
        traits = (
            personality.interview(project, planned, cache, judge_cfg, skipped, backends)
            if cfg.questionnaire
            else {}
        )
        lap("questionnaire")
        probe_records, robust = (
            robustness.run(project, planned, cache, backends, judge_cfg, encode)
            if cfg.robustness.enabled
            else ([], {})
        )
        lap("robustness")
    finally:
        close(backends)
    by_id = {item.id: item for item in items}
    rows = [
        row_of(r, by_id[r.item], c, split_inline(c.text)) for r, c in zip(requests, completions, strict=True)
    ]

    # Judge: first its own accuracy at telling the real passage from decoys, then agreement, false
    # premises and two-order preference against the baseline.
    judge_validity: dict[str, Any] = {}
    if judge_cfg is not None:
        personas = {f"{p.id}/{s.id}": (p.name, s.time) for p in project.personas.values() for s in p.stages}
        baseline = cfg.baseline if any(s.name == cfg.baseline for s in planned) else None
        if baseline is None:
            skipped.setdefault("preference", f"baseline {cfg.baseline!r} did not run; no pairwise preference")
        judge_validity = judging.validity(
            judge_cfg,
            cache,
            dict(cfg.judge_params),
            likelihood.plan(project, passages, list(cfg.likelihood.decoys), project.config.seed),
            personas,
            cfg.resamples,
            project.config.seed,
        )
        judging.judge_all(judge_cfg, cache, dict(cfg.judge_params), rows, baseline, personas)
        if cfg.second_judge is not None:
            judging.judge_all(
                cfg.second_judge, cache, dict(cfg.judge_params), rows, baseline, personas, key="second_judge"
            )
    elif cfg.second_judge is not None:
        skipped["second_judge"] = "eval.second_judge needs eval.judge (agreement is between two judges)"

    lap("judge")

    # Metrics, with paired bootstrap intervals over items.
    scored = scores.score(project, rows, encode, cfg.baseline, cfg.resamples)
    lap("scoring")

    # Outputs: generations, metrics, report; the manifest last.
    result: dict[str, Any] = {
        "definitions": DEFINITIONS,
        "settings": {
            "systems": [s.name for s in planned],
            "skipped": skipped,
            "samples": cfg.samples,
            "params": params,
            "max_items": max_items or cfg.max_items,
            "base_model": project.config.base_model.model,
            "generation_backend": project.config.base_model.backend,
            "judge": judge_cfg.model if judge_cfg else None,
            "judge_params": dict(cfg.judge_params) if judge_cfg else None,
            "second_judge": cfg.second_judge.model if cfg.second_judge and judge_cfg else None,
            "baseline": cfg.baseline,
            "embedder": project.config.embedder.model,
            "seed": project.config.seed,
            "resamples": cfg.resamples,
            "confidence": 0.95,
        },
        "seconds": timings,
        "counts": {
            "items": len(items),
            "golden_items": len(golden),
            "heldout_items": len(heldout),
            "heldout_exchanges": sum(item.source == "exchange" for item in heldout),
            "generations": len(rows),
        },
        "systems": scored["systems"],
        "differences": scored["differences"],
        "reference": scored["reference"],
        "personality": traits,
        "judging": judging.hygiene(rows, cfg.baseline, cfg.resamples, project.config.seed)
        if judge_cfg
        else {},
        "judge_validity": judge_validity,
        "likelihood": fidelity,
        "robustness": robust,
    }
    write_jsonl(project.layout.generations, rows)
    write_jsonl(project.layout.robustness, probe_records)
    write_json_atomic(project.layout.metrics, result)
    report.write_report(out, result, rows)
    for system in planned:
        if system.mode == "trained":
            for persona_id, folder in system.adapters.items():
                card.write_evaluation(folder, card.evaluation_lines(result, system.name, persona_id))
    record_stage(
        project,
        "eval",
        status="done",
        seconds=round(time.monotonic() - started, 3),
        systems=[s.name for s in planned],
        skipped=skipped,
        counts=result["counts"],
        judge=judge_cfg.model_dump(mode="json") if judge_cfg else None,
        judge_params=dict(cfg.judge_params) if judge_cfg else None,
        second_judge=cfg.second_judge.model_dump(mode="json") if cfg.second_judge and judge_cfg else None,
    )
    return result


def no_golden_reason(project: "Project", persona_id: str) -> str:
    """Why a persona has no annotator-golden items: nothing annotator-written was planned, the test share
    is 0, or the test file is empty for another reason."""
    annotate = project.config.annotate
    shares = annotate.own_words_shares(project.config.annotator.model)
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
    if project.config.curate.test_fraction == 0:
        return "curate.test_fraction is 0: no annotator-written dialogue is held out for testing"
    test = project.layout.sft_test(persona_id)
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
