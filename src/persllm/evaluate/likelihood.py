"""Fidelity by likelihood: how probable each system finds the person's real, held-out words.

No judge and no generation: every held-out own-words item (a real passage and the question back-written
for it) is scored by one forward pass per candidate reply, under the system's exact prompt (``prompt``:
the full profile; ``rag``: plus its retrieved context; trained systems: their trained prompt and stage
label; see ``systems.messages_for``). Per item and system:

- ``heldout_nll``: mean negative log-likelihood per token (nats/token) of the real passage as the reply.
- ``pick_*``: the real passage against decoys, each scored as the reply to the same prompt; the system
  prefers the candidate with the lower NLL per token (length-normalised). Decoys are held-out passages
  too (no system trained on them): the same persona at another stage, another persona, the same stage.
  ``pick_real`` is the real passage beating all of them (chance 1 / (decoys + 1)); each ``pick_vs_*`` the
  real passage beating that one decoy (chance 0.5).
- ``stage_wins`` / ``stage_margin``: the real passage scored under each of its persona's stages' prompts
  (that stage's time phrase and label); whether its own stage gives the lowest NLL (chance 1 / stages),
  and the mean NLL under the other stages minus the NLL under its own (nats/token; above 0 = the own
  stage fits better).

Every system is scored on the same items, so ``system - baseline`` intervals are paired bootstrap
intervals. Systems are scored through transformers: a ``llamacpp`` generation backend is scored through
the same weights in transformers (the base model and the persona's adapter folder); a system behind an
OpenAI-compatible endpoint is skipped with the reason (chat completions give no prompt log-probabilities).
"""

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from persllm import stats
from persllm.config import Workspace
from persllm.config.evaluate import DECOY_KINDS
from persllm.config.stages import EvalSettings
from persllm.evaluate.systems import (
    BUILTIN,
    Item,
    Progress,
    System,
    adapter_name,
    messages_for,
    stage_prompts,
)
from persllm.llm import TransformersBackend
from persllm.llm.base import BASE_ADAPTER, Message
from persllm.metric_catalog import definitions, lower_is_better, names

METRICS = names("likelihood")
LOWER_IS_BETTER = tuple(sorted(lower_is_better("likelihood")))
DEFINITIONS = definitions("likelihood")

Context = Callable[[Item], dict[str, str] | None]


@dataclass
class Plan:
    """What one item asks of a system: the real passage, its decoys, and its persona's other stages."""

    item: Item
    decoys: dict[str, str]  # decoy kind -> passage
    other_stages: list[Item]  # the item re-prompted at each other stage of its persona


def plan(workspace: Workspace, items: list[Item], kinds: list[str], seed: int) -> list[Plan]:
    """Decoys and stage variants for every held-out item; a decoy that has no candidate is left out."""
    by_persona_stage: dict[tuple[str, str], list[Item]] = {}
    for item in items:
        by_persona_stage.setdefault((item.persona, item.stage), []).append(item)
    plans = []
    for item in items:
        rng = np.random.default_rng([seed, zlib.crc32(item.id.encode())])
        pools = {
            "other_stage": [
                i
                for (p, s), group in by_persona_stage.items()
                if p == item.persona and s != item.stage
                for i in group
            ],
            "other_persona": [
                i for (p, _), group in by_persona_stage.items() if p != item.persona for i in group
            ],
            "same_stage": [i for i in by_persona_stage[(item.persona, item.stage)] if i.id != item.id],
        }
        decoys = {}
        for kind in kinds:
            pool = [i for i in pools[kind] if i.reference != item.reference]
            if pool:
                decoys[kind] = pool[int(rng.integers(len(pool)))].reference
        persona = workspace.persona(item.persona)
        others = []
        for stage in persona.stages:
            if stage.id != item.stage:
                full, brief = stage_prompts(persona, stage)
                others.append(
                    replace(item, stage=stage.id, label=stage.label, system=full, brief=brief, context=None)
                )
        plans.append(Plan(item, decoys, others))
    return plans


def score_system(
    score: Callable[[str, list[list[Message]], list[str]], list[float]],
    system: System,
    plans: list[Plan],
    context: Context,
    progress: Callable[[int], None],
) -> dict[str, list[float | None]]:
    """Per-item values of every metric for one system. ``score(persona, conversations, replies)`` gives the
    mean log-probability per token of each reply."""
    values: dict[str, list[float | None]] = {name: [None] * len(plans) for name in METRICS}
    for persona in dict.fromkeys(p.item.persona for p in plans):
        mine = [i for i, p in enumerate(plans) if p.item.persona == persona]
        conversations: list[list[Message]] = []
        replies: list[str] = []
        slots: list[tuple[int, str]] = []  # (plan index, "real" | decoy kind | "stage:<id>")
        for i in mine:
            entry = plans[i]
            messages = messages_for(system, entry.item, context)
            for key, reply in [("real", entry.item.reference), *entry.decoys.items()]:
                conversations.append(messages)
                replies.append(reply)
                slots.append((i, key))
            for other in entry.other_stages:
                conversations.append(messages_for(system, other, context))
                replies.append(entry.item.reference)
                slots.append((i, f"stage:{other.stage}"))
        scores = score(persona, conversations, replies)
        nll: dict[int, dict[str, float]] = {i: {} for i in mine}
        for (i, key), value in zip(slots, scores, strict=True):
            nll[i][key] = -value
        for i in mine:
            fill(values, i, nll[i])
        progress(len(conversations))
    return values


def fill(values: dict[str, list[float | None]], i: int, nll: dict[str, float]) -> None:
    """One item's metrics from its NLLs per candidate (``real``, decoy kinds, ``stage:<id>``)."""
    real = nll["real"]
    values["heldout_nll"][i] = real
    decoys = {k: v for k, v in nll.items() if k in DECOY_KINDS}
    for kind, value in decoys.items():
        values[f"pick_vs_{kind}"][i] = float(real < value)
    if decoys:
        values["pick_real"][i] = float(real < min(decoys.values()))
    others = [v for k, v in nll.items() if k.startswith("stage:")]
    if others:
        values["stage_wins"][i] = float(real < min(others))
        values["stage_margin"][i] = float(np.mean(others) - real)


def summarise(
    per_system: dict[str, dict[str, list[float | None]]],
    plans: list[Plan],
    baseline: str,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Estimates per system, paired differences to the baseline, and the chance level of each metric."""
    indices = stats.resample_indices(len(plans), resamples, seed)
    systems = {
        name: {m: stats.mean_estimate(v, indices).to_dict() for m, v in values.items()}
        for name, values in per_system.items()
    }

    def versus(other: str) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, values in per_system.items():
            if name == other:
                continue
            found[name] = {}
            for metric, vector in values.items():
                estimate = stats.mean_difference(vector, per_system[other][metric], indices)
                found[name][metric] = {**estimate.to_dict(), "excludes_zero": estimate.excludes_zero()}
        return found

    differences = versus(baseline) if baseline in per_system else {}
    with_decoys = [len(p.decoys) for p in plans if p.decoys]
    with_stages = [len(p.other_stages) + 1 for p in plans if p.other_stages]
    chance = {
        "pick_real": float(np.mean([1 / (k + 1) for k in with_decoys])) if with_decoys else None,
        **{f"pick_vs_{kind}": 0.5 for kind in DECOY_KINDS},
        "stage_wins": float(np.mean([1 / s for s in with_stages])) if with_stages else None,
        "stage_margin": 0.0,
    }
    # Every system against rag too: a personified model should beat retrieval, not only the bare prompt.
    against_rag = versus("rag") if "rag" in per_system and baseline != "rag" else {}
    return {"systems": systems, "differences": differences, "differences_rag": against_rag, "chance": chance}


def run(
    settings: EvalSettings,
    workspace: Workspace,
    systems: list[System],
    items: list[Item],
    context: Context,
    backends: dict[str, Any],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """The likelihood metrics of ``systems`` on the held-out own-words ``items`` (metrics.json's
    ``likelihood``); a system that cannot be scored is recorded in ``skipped``."""
    cfg = settings.eval.likelihood
    if not cfg.enabled:
        return {}
    items = [item for item in items if item.set == "heldout"]
    if not items:
        skipped["likelihood"] = "no held-out own words with questions: set holdout.share above 0"
        return {}
    plans = plan(workspace, items, list(cfg.decoys), settings.seed)
    if all(not p.other_stages for p in plans):
        skipped["stage discrimination"] = "every persona has one stage; stage_wins needs two or more"
    scorers = {}
    for system in systems:
        scorer = scorer_for(settings, workspace, system, backends, cfg.max_tokens)
        if isinstance(scorer, str):
            skipped[f"{system.name} (likelihood)"] = scorer
        else:
            scorers[system.name] = (system, scorer)
    rows_per_system = sum(1 + len(p.decoys) + len(p.other_stages) for p in plans)
    started = time.monotonic()
    progress = Progress("eval likelihood", "passages scored", rows_per_system * len(scorers))

    per_system = {
        name: score_system(scorer, system, plans, context, progress.advance)
        for name, (system, scorer) in scorers.items()
    }
    if not per_system:
        return {}
    summary = summarise(per_system, plans, settings.eval.baseline, settings.eval.resamples, settings.seed)
    return {
        **summary,
        "definitions": DEFINITIONS,
        "lower_is_better": list(LOWER_IS_BETTER),
        "counts": {
            "items": len(plans),
            "decoys": {kind: sum(kind in p.decoys for p in plans) for kind in cfg.decoys},
            "stages": {p.item.persona: len(p.other_stages) + 1 for p in plans},
            "passages_scored": progress.total,
        },
        "max_tokens": cfg.max_tokens,
        "seconds": round(time.monotonic() - started, 1),
    }


def scorer_for(
    settings: EvalSettings, workspace: Workspace, system: System, backends: dict[str, Any], max_tokens: int
) -> Callable[[str, list[list[Message]], list[str]], list[float]] | str:
    """``score(persona, conversations, replies)`` for a system, or why it cannot be scored."""

    llm = system.llm
    if llm.backend == "openai":
        return "served by an OpenAI-compatible endpoint: chat completions give no prompt log-probabilities"
    if llm.backend == "llamacpp":
        if system.name not in BUILTIN:
            return "a llama.cpp model outside the pipeline: no transformers weights to score it with"
        llm = llm.model_copy(update={"backend": "transformers", "model": settings.base_model.model})
    key = llm.model_dump_json(exclude={"adapter", "params"})
    if key not in backends:
        backends[key] = TransformersBackend(llm.model_copy(update={"adapter": None}))
    backend = getattr(backends[key], "inner", backends[key])
    names: dict[str, str | None] = {}
    for persona in workspace.personas:
        folder = system.adapters.get(persona) if system.mode == "trained" else None
        if folder is None:
            names[persona] = BASE_ADAPTER
            continue
        name = adapter_name(persona, system)
        if name not in backend.adapters:
            backend.add_adapter(name, folder)
        names[persona] = name

    def score(persona: str, conversations: list[list[Message]], replies: list[str]) -> list[float]:
        rows = backend.reply_logprobs(conversations, replies, {"adapter": names[persona]}, max_tokens)
        return [float(np.mean(row)) if row else float("nan") for row in rows]

    return score
