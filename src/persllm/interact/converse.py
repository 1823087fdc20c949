"""``persllm converse``: several persona models (or any backends) talk about a scenario, seeded.

Each agent sees the conversation from its own side: its own replies as assistant turns, the others'
as user turns ``"Name: text"``, after an opening user turn that states the scenario. Outputs in the
run folder (or ``--out``): ``transcript.jsonl`` (rewritten atomically after every turn),
``transcript.md`` and ``measures.json`` (see ``interact.measures``).
"""

import asyncio
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm import __version__
from persllm.config import PersonaConfig, Project
from persllm.config.interact import AgentConfig, ConverseConfig
from persllm.errors import UserError
from persllm.evaluate.probes import out_of_character
from persllm.hashing import stable_hash
from persllm.index.encoder import embed
from persllm.interact import measures
from persllm.interact.models import ModelPool, ModelRef, Speaker, best_variant, chat_ref, resolve_model_id
from persllm.interact.prompting import PROMPTS, fit, merge_consecutive, persona_system, template
from persllm.jsonl import write_jsonl
from persllm.layout import write_atomic
from persllm.llm import make_backend
from persllm.llm.base import Message
from persllm.metric_catalog import fmt_estimate
from persllm.prompting import parse_yes_no, split_inline
from persllm.terms import salient_terms

ORDERS = ("round-robin", "random")


@dataclass
class Agent:
    """One participant: who it is, what it runs on, and how it is introduced."""

    key: str
    name: str
    model: str
    system: str
    persona: PersonaConfig | None = None
    stage: str | None = None
    ref: ModelRef | None = None
    llm: Any = None  # LLMConfig of an agent on another backend
    speaker: Speaker | None = None


def run(
    project: Project,
    agents: list[str],
    scenario: str,
    turns: int,
    out: Path | None = None,
    order: str = "round-robin",
    cfg: ConverseConfig | None = None,
    on_turn: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Hold the conversation and measure it; returns the output folder.

    Args:
        agents: two or more agent names: keys of ``converse.agents``, persona ids, or model ids
            ``persona:stage[:variant]``.
        turns: replies in total (round-robin: each agent in turn; random: never the same twice in a row).
        on_turn: called with every transcript row as it is written (the CLI prints them).
    """
    cfg = cfg or converse_config(project)
    if order not in ORDERS:
        raise UserError(f"--order {order}: unknown; use one of: {', '.join(ORDERS)}")
    if len(agents) < 2:
        raise UserError("--personas: a conversation needs at least two agents, e.g. --personas elsie,jonah")
    if turns < 1:
        raise UserError("--turns: must be at least 1")
    seed = project.config.seed

    # agents: resolve them and load every local adapter onto the one base model
    cast = [make_agent(project, key, cfg) for key in agents]
    _unique_names(cast)
    pool = ModelPool(project)
    local = [a for a in cast if a.ref is not None]
    for agent, speaker in zip(local, pool.speakers([a.ref for a in local if a.ref]), strict=True):
        agent.speaker = speaker
    for agent in cast:
        if agent.speaker is None:
            agent.speaker = Speaker(make_backend(agent.llm))
    folder = out or default_out(project, agents, scenario, turns, order, seed)
    folder.mkdir(parents=True, exist_ok=True)

    # the conversation
    speakers = speaking_order(len(cast), turns, order, seed)
    rows: list[dict[str, Any]] = []
    asyncio.run(_converse(cast, speakers, scenario, cfg, seed, folder, rows, on_turn))

    # measures and reports
    result = asyncio.run(measure(project, cfg, cast, rows, scenario))
    result["settings"] = {
        "agents": agents,
        "scenario": scenario,
        "turns": turns,
        "order": order,
        "seed": seed,
        "params": cfg.params,
        "models": {a.key: a.model for a in cast},
        "persllm_version": __version__,
    }
    write_atomic(folder / "measures.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_atomic(folder / "transcript.md", markdown(scenario, cast, rows, result))
    return folder


async def _converse(
    cast: list[Agent],
    speakers: list[int],
    scenario: str,
    cfg: ConverseConfig,
    seed: int,
    folder: Path,
    rows: list[dict[str, Any]],
    on_turn: Callable[[dict[str, Any]], None] | None,
) -> None:
    try:
        for turn, index in enumerate(speakers):
            agent = cast[index]
            assert agent.speaker is not None
            messages = agent_messages(agent, cast, scenario, rows)
            label = agent.speaker.label
            prompt = fit(messages, agent.speaker.count_tokens, cfg.context_tokens, label, pinned=1)
            completion = await agent.speaker.generate(prompt, {**cfg.params, "seed": seed + turn})
            analysis, response = split_inline(completion.text)
            row = {
                "turn": turn,
                "agent": agent.key,
                "name": agent.name,
                "model": agent.model,
                "text": response,
                "analysis": analysis,
                "finish_reason": completion.finish_reason,
                "completion_tokens": completion.completion_tokens,
                "seconds": round(completion.seconds, 3),
            }
            rows.append(row)
            write_jsonl(folder / "transcript.jsonl", rows)
            if on_turn is not None:
                on_turn(row)
    finally:
        for agent in cast:
            if agent.speaker is not None:
                await agent.speaker.backend.aclose()


def converse_config(project: Project) -> ConverseConfig:
    """``converse:`` of the project file (a default block until the project config has one)."""
    found = getattr(project.config, "converse", None)
    return found if isinstance(found, ConverseConfig) else ConverseConfig.model_validate({})


def make_agent(project: Project, key: str, cfg: ConverseConfig) -> Agent:
    """An agent from a ``converse.agents`` key, a persona id or a ``persona:stage[:variant]`` id."""
    spec = cfg.agents.get(key)
    if spec is None:
        persona_id, _, rest = key.partition(":")
        if persona_id not in project.personas:
            known = ", ".join([*cfg.agents, *project.personas])
            raise UserError(f"--personas: {key!r} is no agent, persona or model id; use one of: {known}")
        persona = project.personas[persona_id]
        ref = resolve_model_id(project, key if rest else f"{key}:{persona.stages[-1].id}")
        system = persona_system(persona, ref.stage or "", prompt_style=ref.system_style)
        return Agent(key, persona.name, ref.id, system, persona, ref.stage, ref)
    return _configured_agent(project, key, spec)


def _configured_agent(project: Project, key: str, spec: AgentConfig) -> Agent:
    persona = project.persona(spec.persona) if spec.persona else None
    stage = (persona.stage(spec.stage).id if spec.stage else persona.stages[-1].id) if persona else None
    name = spec.name or (persona.name if persona else key)
    if spec.llm is not None:
        if persona is not None and stage is not None:
            system = spec.system or persona_system(persona, stage)
        else:
            system = spec.system or f"You are {name}."
        return Agent(key, name, f"{spec.llm.backend}:{spec.llm.model}", system, persona, stage, llm=spec.llm)
    assert persona is not None and stage is not None
    model = spec.model if spec.model != "best" else best_variant(project, persona.id)
    ref = chat_ref(project, persona.id, stage, model)
    system = spec.system or persona_system(persona, stage, prompt_style=ref.system_style)
    return Agent(key, name, ref.id, system, persona, stage, ref)


def _unique_names(cast: list[Agent]) -> None:
    seen: dict[str, int] = {}
    for agent in cast:
        seen[agent.name] = seen.get(agent.name, 0) + 1
    for agent in cast:
        if seen[agent.name] > 1:
            agent.name = f"{agent.name} ({agent.stage or agent.key})"
    if len({a.name for a in cast}) < len(cast):
        raise UserError(
            "--personas: two agents would have the same name; give them `name`s in converse.agents"
        )


def default_out(
    project: Project, agents: list[str], scenario: str, turns: int, order: str, seed: int
) -> Path:
    """``<run_dir>/converse/<slug>-<hash>``: the same inputs always land in the same folder."""
    slug = "-".join(re.findall(r"[a-z0-9]+", scenario.lower())[:6]) or "conversation"
    digest = stable_hash(
        {"agents": agents, "scenario": scenario, "turns": turns, "order": order, "seed": seed}, 8
    )
    return project.layout.converse / f"{slug}-{digest}"


def speaking_order(agents: int, turns: int, order: str, seed: int) -> list[int]:
    """Who speaks at each turn: in turn, or at random (seeded) but never twice in a row."""
    if order == "round-robin":
        return [turn % agents for turn in range(turns)]
    rng = random.Random(seed)
    result: list[int] = []
    for _ in range(turns):
        choices = [i for i in range(agents) if not result or i != result[-1]]
        result.append(rng.choice(choices))
    return result


def agent_messages(
    agent: Agent, cast: list[Agent], scenario: str, rows: list[dict[str, Any]]
) -> list[Message]:
    """The conversation so far as ``agent`` sees it."""
    others = [a.name for a in cast if a is not agent]
    system = f"{agent.system}\n\n{template('converse_system.txt').format(others=', '.join(others)).strip()}"
    opening = template("converse_opening.txt").format(
        scenario=scenario.strip(), everyone=", ".join(a.name for a in cast)
    )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": opening.strip()}]
    for row in rows:
        if row["agent"] == agent.key:
            messages.append({"role": "assistant", "content": row["text"]})
        else:
            messages.append({"role": "user", "content": f"{row['name']}: {row['text']}"})
    return merge_consecutive(messages)


async def measure(
    project: Project, cfg: ConverseConfig, cast: list[Agent], rows: list[dict[str, Any]], scenario: str
) -> dict[str, Any]:
    """Per agent: stance consistency, topic coverage and flattery rate."""

    vectors = embed([row["text"] or "(silence)" for row in rows], project.config.embedder)
    everything = {term for row in rows for term in salient_terms(row["text"])}
    judge = _judge(cfg)
    lexicon = measures.load_lexicon(lexicon_path(project, cfg))
    per_agent = []
    for agent in cast:
        mine = [i for i, row in enumerate(rows) if row["agent"] == agent.key]
        replies = [rows[i]["text"] for i in mine]
        stance: dict[str, Any] = {
            "reference_replies": cfg.reference_replies,
            "embedding_drift": measures.drift(vectors[mine], cfg.reference_replies),
        }
        flips = measures.flips(
            replies, vectors[mine], cfg.reference_replies, project.config.eval.robustness.flip_similarity
        )
        stance["flip_rate"] = measures.share_estimate(flips, project.config.seed) if flips else None
        stance["out_of_character_rate"] = measures.share_estimate(
            [out_of_character(r) for r in replies], project.config.seed
        )
        flattery: dict[str, Any]
        if judge is not None:
            stance.update(await _judge_stance(judge, agent, replies, cfg.reference_replies, scenario))
            flattery = await _judge_flattery(judge, agent, rows, mine, scenario)
        else:
            hits = [measures.flattering_phrases(reply, lexicon) for reply in replies]
            flagged = [rows[i]["turn"] for i, found in zip(mine, hits, strict=True) if found]
            phrases = sorted({p for found in hits for p in found})
            flattery = {
                "method": "lexicon",
                "rate": measures.rate([bool(h) for h in hits]),
                "flagged_turns": flagged,
            }
            flattery["phrases"] = phrases
        per_agent.append(
            {
                "agent": agent.key,
                "name": agent.name,
                "model": agent.model,
                "replies": len(replies),
                "stance": stance,
                "coverage": measures.coverage(replies, everything),
                "flattery": flattery,
            }
        )
    if judge is not None:
        await judge.aclose()
    return {"agents": per_agent, "conversation_terms": len(everything), "turns": len(rows)}


def lexicon_path(project: Project, cfg: ConverseConfig) -> Path:
    if cfg.flattery_lexicon is None:
        return PROMPTS / "flattery_lexicon.txt"
    path = project.root / cfg.flattery_lexicon
    if not path.is_file():
        raise UserError(
            f"converse.flattery_lexicon: {path} not found; fix the path (relative to the project file)"
        )
    return path


def _judge(cfg: ConverseConfig) -> Any:
    if cfg.judge is None:
        return None

    return make_backend(cfg.judge)


JUDGE_PARAMS = {"temperature": 0.0, "max_tokens": 16}


async def _judge_stance(
    judge: Any, agent: Agent, replies: list[str], reference: int, scenario: str
) -> dict[str, Any]:
    first = "\n\n".join(replies[:reference])
    prompts = [
        template("judge_stance.txt").format(
            scenario=scenario, speaker=agent.name, reference=first, later=later
        )
        for later in replies[reference:]
    ]
    answers = await asyncio.gather(
        *(judge.generate([{"role": "user", "content": p}], JUDGE_PARAMS) for p in prompts)
    )
    scores = [measures.parse_score(answer.text) for answer in answers]
    valid = [s for s in scores if s is not None]
    return {"judge_scores": scores, "judge_agreement": round(sum(valid) / len(valid), 3) if valid else None}


async def _judge_flattery(
    judge: Any, agent: Agent, rows: list[dict[str, Any]], mine: list[int], scenario: str
) -> dict[str, Any]:
    prompts = []
    for i in mine:
        before: list[str] = []
        for row in reversed(rows[:i]):
            if row["agent"] == agent.key:
                break
            before.insert(0, f"{row['name']}: {row['text']}")
        prompts.append(
            template("judge_flattery.txt").format(
                scenario=scenario,
                before="\n".join(before) or "(nothing yet)",
                speaker=agent.name,
                reply=rows[i]["text"],
            )
        )
    answers = await asyncio.gather(
        *(judge.generate([{"role": "user", "content": p}], JUDGE_PARAMS) for p in prompts)
    )
    verdicts = [parse_yes_no(answer.text) for answer in answers]
    flagged = [rows[i]["turn"] for i, verdict in zip(mine, verdicts, strict=True) if verdict]
    known = [v for v in verdicts if v is not None]
    return {
        "method": "judge",
        "rate": measures.rate(known),
        "flagged_turns": flagged,
        "unparsed": verdicts.count(None),
    }


def markdown(scenario: str, cast: list[Agent], rows: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """The transcript and a table of the measures."""

    lines = ["# Conversation", "", f"**Scenario:** {scenario.strip()}", ""]
    lines += [f"- **{a.name}**: `{a.model}`" for a in cast] + ["", "## Transcript", ""]
    for row in rows:
        lines += [f"**{row['name']}** (turn {row['turn'] + 1}): {row['text'] or '_(no reply)_'}", ""]
    lines += [
        "## Measures",
        "",
        "| Agent | Replies | Stance consistency | Stance flip rate | Out of character "
        "| Judge agreement (1-5) "
        "| Distinct terms | Flattery rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["agents"]:
        drift = m["stance"]["embedding_drift"]
        consistency = f"{drift['consistency']:.3f}" if drift else "-"
        agreement = m["stance"].get("judge_agreement")
        flattery = f"{m['flattery']['rate']:.2f} ({m['flattery']['method']})"
        flip, ooc = fmt_estimate(m["stance"]["flip_rate"]), fmt_estimate(m["stance"]["out_of_character_rate"])
        lines.append(
            f"| {m['name']} | {m['replies']} | {consistency} | {flip} | {ooc} "
            f"| {agreement if agreement is not None else '-'} "
            f"| {m['coverage']['distinct_terms']} | {flattery} |"
        )
    lines += [
        "",
        "Stance consistency: 1 - mean cosine distance of later replies from the agent's first "
        f"{result['agents'][0]['stance']['reference_replies']} (sentence embeddings). Stance flip rate: "
        "share of later replies that give in (a capitulating phrase) or whose cosine to that stance is below "
        "eval.robustness.flip_similarity, with a 95% bootstrap interval over replies.",
        "",
    ]
    return "\n".join(lines)
