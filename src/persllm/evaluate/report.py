"""The evaluation report: ``report.md``, a self-contained ``report.html`` and PNG plots in ``plots/``.

Everything is rebuilt from ``metrics.json`` and ``generations.jsonl`` alone (``run``), so a report can be
regenerated or restyled without generating anything. The page is assembled as a list of blocks that
render to both Markdown and HTML; the HTML embeds the plots as base64 data URIs.
"""

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persllm import metric_catalog
from persllm.config import TRAITS
from persllm.errors import UserError
from persllm.jsonl import read_jsonl
from persllm.layout import write_atomic
from persllm.metric_catalog import fmt, fmt_estimate

if TYPE_CHECKING:
    from persllm.config import Project

Block = tuple[
    Any, ...
]  # ("h2", text) | ("p", text) | ("list", items) | ("table", headers, rows) | ("img", file, alt)

OVERVIEW = list(metric_catalog.names("generation"))
SMALL_SAMPLE = 30  # items: fewer than this and the report says the intervals are rough
DISTINCTION = list(metric_catalog.names("distinction"))
JUDGED = list(metric_catalog.names("judged"))


def run(project: "Project") -> dict[str, Path]:
    """Rebuild the report of the last evaluation from ``eval/metrics.json`` and ``eval/generations.jsonl``."""
    layout = project.layout
    path = layout.metrics
    if not path.exists():
        raise UserError(f"{path}: no evaluation results; run `persllm eval {project.config_path}` first")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg}); re-run `persllm eval`") from None
    return write_report(layout.eval, metrics, read_jsonl(layout.generations))


def write_report(out: Path, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Plots, ``report.md`` and ``report.html`` in ``out``; returns their paths."""
    plots = make_plots(out / "plots", metrics)
    blocks = build_blocks(metrics, rows, plots)
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    write_atomic(paths["markdown"], to_markdown(blocks))
    write_atomic(paths["html"], to_html(blocks, out))
    return paths


# --------------------------------------------------------------------------- content


def metric_table(systems: dict[str, Any], names: list[str]) -> Block:
    """Systems x ``names`` of the annotator-golden set, or of the held-out set when there is none."""
    key = "overall" if any(s.get("overall", {}).get("n") for s in systems.values()) else "heldout"
    shown = [n for n in names if any(s.get(key, {}).get(n) is not None for s in systems.values())]
    rows = [[name, *(fmt(s.get(key, {}).get(n)) for n in shown)] for name, s in systems.items()]
    return ("table", ["system", *shown], rows)


# The metrics every summary leads with: the run summary, the report's headline and each model card.


def interval_table(systems: dict[str, Any], key: str, names: list[str], extra: dict[str, Any]) -> Block:
    """Systems x metrics of one set, each cell a value with its 95% interval; ``extra`` rows appended."""
    entries = {name: data for name, data in systems.items() if key in data}
    entries.update(extra)
    shown = [n for n in names if any(e.get(key, {}).get(n) is not None for e in entries.values())]
    body = [[name, *(cell(e, key, n) for n in shown)] for name, e in entries.items()]
    return ("table", ["system", *shown], body)


def cell(entry: dict[str, Any], key: str, name: str) -> str:
    """A metric with its interval where there is one, else its bare value."""
    estimate = entry.get(f"{key}_ci", {}).get(name)
    return fmt_estimate(estimate) if estimate else fmt(entry.get(key, {}).get(name))


def difference_table(differences: dict[str, Any], baseline: str, names: list[str]) -> Block:
    """``system - baseline`` per metric with its paired interval; ``*`` where the interval excludes 0."""
    shown = [n for n in names if any(d.get(n, {}).get("value") is not None for d in differences.values())]
    body = []
    for system, metrics in differences.items():
        cells = []
        for name in shown:
            estimate = metrics.get(name)
            mark = " *" if estimate and estimate.get("excludes_zero") else ""
            cells.append(fmt_estimate(estimate, signed=True) + mark)
        body.append([f"{system} - {baseline}", *cells])
    return ("table", ["difference", *shown], body)


def set_blocks(metrics: dict[str, Any], key: str, title: str, intro: str) -> list[Block]:
    """One evaluation set: its table with intervals, its differences to the baseline, a small-sample note."""
    systems = metrics.get("systems", {})
    if not any(key in data for data in systems.values()):
        return []
    settings = metrics.get("settings", {})
    baseline = settings.get("baseline", "prompt")
    extra = (
        {"reference (real words)": metrics["reference"]}
        if key == "heldout" and metrics.get("reference")
        else {}
    )
    blocks: list[Block] = [("h2", title), ("p", intro), interval_table(systems, key, OVERVIEW, extra)]
    differences = metrics.get("differences", {}).get(key) or {}
    if differences:
        blocks.append(difference_table(differences, baseline, OVERVIEW))
        blocks.append(
            (
                "p",
                f"Paired bootstrap over items ({settings.get('resamples', 1000)} resamples, 95% percentile "
                "intervals); * marks a difference whose interval excludes 0.",
            )
        )
    n_items = metrics.get("counts", {}).get("heldout_items" if key == "heldout" else "golden_items")
    if isinstance(n_items, int) and n_items < SMALL_SAMPLE:
        blocks.append(
            ("p", f"Small sample: {n_items} items. The intervals are wide and only roughly calibrated.")
        )
    return blocks


def build_blocks(metrics: dict[str, Any], rows: list[dict[str, Any]], plots: dict[str, str]) -> list[Block]:
    """The report's content, top to bottom."""
    settings, systems = metrics.get("settings", {}), metrics.get("systems", {})
    definitions = metrics.get("definitions", {})
    blocks: list[Block] = [("h1", "persllm evaluation")]
    blocks.append(
        (
            "list",
            [
                f"systems: {', '.join(settings.get('systems', [])) or 'none'}",
                f"base model: {settings.get('base_model')} "
                f"(generating in {settings.get('generation_backend', 'transformers')}); "
                f"embedder: {settings.get('embedder')}",
                f"items: {metrics.get('counts', {}).get('items')}; samples: {settings.get('samples')}; "
                f"sampling: {json.dumps(settings.get('params', {}), sort_keys=True)}",
                f"judge: {settings.get('judge') or 'none'}; preference baseline: {settings.get('baseline')}",
            ],
        )
    )
    skipped = settings.get("skipped") or {}
    if skipped:
        blocks += [("h2", "Skipped"), ("list", [f"{name}: {why}" for name, why in skipped.items()])]
    blocks += likelihood_blocks(metrics.get("likelihood") or {}, settings.get("baseline", "prompt"), plots)
    blocks += set_blocks(
        metrics,
        "heldout",
        "Held-out real words",
        "Each item is a passage of the person's own words that no training file contains, with the question "
        "the annotator back-wrote for it; every system answers the question and is scored against the real "
        "passage. The reference row scores the passages themselves.",
    )
    blocks += set_blocks(
        metrics,
        "overall",
        "Annotator-golden (the paper's setting)",
        "Held-out annotator dialogues: the reference is the annotator's golden reply, so these numbers "
        "reward imitating the annotator.",
    )
    if systems:
        blocks += [("h2", "Output health"), metric_table(systems, ["n", "empty_rate", "completion_tokens"])]
        blocks += [("img", plots["overview"], "overview")] if "overview" in plots else []
        blocks += [("h2", "Distinction (Intra / Stage / Inter)"), distinction_table(systems)]
        blocks += [("img", plots["distinction"], "distinction")] if "distinction" in plots else []
        if any(s.get("overall", {}).get(n) is not None for s in systems.values() for n in JUDGED):
            blocks += [("h2", "Judge")]
            blocks += [("p", judge_validity_line(metrics.get("judge_validity") or {}))]
            blocks += [metric_table(systems, JUDGED)]
            blocks += [("img", plots["judge"], "judge")] if "judge" in plots else []
        blocks += [("h2", "Per persona and stage"), stage_table(systems)]
    blocks += robustness_blocks(metrics.get("robustness") or {}, settings.get("baseline", "prompt"))
    blocks += judging_blocks(metrics.get("judging") or {})
    personality = metrics.get("personality") or {}
    if personality:
        blocks += [("h2", "Personality (questionnaire)"), personality_table(personality)]
        blocks += [("img", plots["personality"], "personality")] if "personality" in plots else []
    blocks += [("h2", "Definitions"), ("list", [f"{name}: {text}" for name, text in definitions.items()])]
    blocks += [("h2", "Examples"), examples_table(rows)]
    return blocks


def judge_validity_line(validity: dict[str, Any]) -> str:
    """The judge's own accuracy at picking the real passage, to read every judge score against."""
    if not validity:
        return "Judge validity: not measured (no held-out own words with decoys)."
    return (
        f"Judge validity: picks the person's real passage among decoys in "
        f"{fmt_estimate(validity.get('accuracy'))} of {validity.get('items')} items (chance "
        f"{fmt(validity.get('chance'))}; {validity.get('unreadable')} unreadable verdicts). A judge near "
        "chance cannot tell the person from the decoys, and its scores below say little."
    )


def likelihood_blocks(likelihood: dict[str, Any], baseline: str, plots: dict[str, str]) -> list[Block]:
    """How likely each system finds the real held-out words: values with intervals, chance, differences."""

    systems = likelihood.get("systems") or {}
    if not systems:
        return []
    counts, chance = likelihood.get("counts", {}), likelihood.get("chance", {})
    shown = [
        m
        for m in metric_catalog.names("likelihood")
        if any(s.get(m, {}).get("value") is not None for s in systems.values())
    ]
    body = [[name, *(fmt_estimate(data.get(m)) for m in shown)] for name, data in systems.items()]
    body.append(["chance", *(fmt(chance.get(m)) for m in shown)])
    blocks: list[Block] = [
        ("h2", "Likelihood of the real words"),
        (
            "p",
            f"{counts.get('items')} held-out passages; each system scores the person's real passage as the "
            f"reply to its question under its own prompt (the first {likelihood.get('max_tokens')} tokens), "
            "against decoy passages and under each of the persona's stages. No judge and no generation. "
            "heldout_nll is nats per token, lower is better; the rest are shares (chance in the last row) "
            "and stage_margin is nats per token, above 0 when the passage's own stage fits it better.",
        ),
        ("table", ["system", *shown], body),
    ]
    differences = likelihood.get("differences") or {}
    if differences:
        blocks.append(difference_table(differences, baseline, shown))
    blocks += [("img", plots["likelihood"], "likelihood")] if "likelihood" in plots else []
    return blocks


def robustness_blocks(robustness: dict[str, Any], baseline: str) -> list[Block]:
    """The probes' metrics per system with intervals, the paired differences, what was skipped."""

    systems = robustness.get("systems") or {}
    if not systems:
        return []
    counts = robustness.get("counts", {})
    blocks: list[Block] = [
        ("h2", "Robustness (corpus-built probes)"),
        (
            "p",
            "Probes per kind: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + ". Lower is better for "
            + ", ".join(sorted(metric_catalog.lower_is_better("robustness")))
            + "; 95% bootstrap intervals over probes; errors are probes whose conversation failed.",
        ),
    ]
    shown = [
        m
        for m in metric_catalog.names("robustness")
        if any(s["metrics"].get(m, {}).get("value") is not None for s in systems.values())
    ]
    body = [
        [name, *(fmt_estimate(data["metrics"].get(m)) for m in shown), str(data.get("errors", 0))]
        for name, data in systems.items()
    ]
    blocks.append(("table", ["system", *shown, "errors"], body))
    differences = robustness.get("differences") or {}
    if differences:
        blocks.append(difference_table(differences, baseline, shown))
    skipped = robustness.get("skipped") or {}
    if skipped:
        blocks.append(("list", [f"{name}: {why}" for name, why in skipped.items()]))
    return blocks


def judging_blocks(judging: dict[str, Any]) -> list[Block]:
    """Judge hygiene: position flips, length-controlled preference, agreement of two judges."""
    if not judging:
        return []
    names = ["position_flip_rate", "win_rate", "win_rate_length_matched", "judges_kappa"]
    shown = [n for n in names if any(n in entry for entry in judging.values())]
    body = [
        [system, str(e["pairs"]), *(fmt_estimate(e.get(n)) for n in shown)] for system, e in judging.items()
    ]
    return [("h2", "Judge hygiene"), ("table", ["system", "pairs", *shown], body)]


def distinction_table(systems: dict[str, Any]) -> Block:
    """Intra / Stage / Inter of each set, with intervals from resampling the pairs."""
    body = []
    shown = [
        n
        for n in DISTINCTION
        if any(d.get(k, {}).get(n) is not None for d in systems.values() for k in ("overall", "heldout"))
    ]
    for key, label in (("heldout", "held-out"), ("overall", "golden")):
        for name, data in systems.items():
            if key in data:
                body.append([name, label, *(cell(data, key, n) for n in shown)])
    return ("table", ["system", "set", *shown], body)


def stage_table(systems: dict[str, Any]) -> Block:
    names = ["n", "bleu", "rouge_l", "anachronism_rate", "knowledge", "attitude"]
    body = []
    for system, data in systems.items():
        for cell, values in data.get("by_stage", {}).items():
            body.append([system, cell, *(fmt(values.get(n)) for n in names)])
    return ("table", ["system", "persona/stage", *names], body)


def personality_table(personality: dict[str, Any]) -> Block:
    body = []
    for system, personas in personality.items():
        for persona, data in personas.items():
            traits, target = data.get("traits", {}), data.get("target") or {}
            cells = [
                f"{fmt(traits.get(t))}" + (f" ({fmt(target[t])})" if t in target else "") for t in TRAITS
            ]
            body.append(
                [
                    system,
                    persona,
                    *cells,
                    fmt(data.get("distance")),
                    f"{data.get('answered')}/{data.get('asked')}",
                ]
            )
    return ("table", ["system", "persona", *(f"{t} (target)" for t in TRAITS), "distance", "answered"], body)


def examples_table(rows: list[dict[str, Any]], items: int = 4, width: int = 280) -> Block:
    """Sample-0 responses of every system for the first few items."""
    chosen = list(dict.fromkeys(r["item"] for r in rows))[:items]
    body = []
    for item in chosen:
        first = [r for r in rows if r["item"] == item and r.get("sample", 0) == 0]
        if not first:
            continue
        body.append(
            ["(question)", f"{first[0]['persona']}/{first[0]['stage']}", _short(first[0]["question"], width)]
        )
        body.append(["(golden)", "", _short(first[0]["reference"], width)])
        body += [[r["system"], "", _short(r["response"], width)] for r in first]
    return ("table", ["who", "persona/stage", "text"], body)


def _short(text: str, width: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# --------------------------------------------------------------------------- plots


def make_plots(folder: Path, metrics: dict[str, Any]) -> dict[str, str]:
    """Bar charts (Agg backend) saved as PNG; returns name -> file name relative to the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    systems = metrics.get("systems", {})
    made: dict[str, str] = {}
    charts = {"overview": OVERVIEW, "distinction": DISTINCTION, "judge": JUDGED}
    for name, metric_names in charts.items():
        # The overview plots the held-out set where there is one: it is the result that matters.
        key = "heldout" if name == "overview" and any("heldout" in s for s in systems.values()) else "overall"
        shown = [m for m in metric_names if any(s.get(key, {}).get(m) is not None for s in systems.values())]
        if not shown:
            continue
        label = "held-out" if key == "heldout" else "golden"
        panels = {
            f"{metric} ({label})": {
                system: data.get(f"{key}_ci", {}).get(metric) or {"value": data.get(key, {}).get(metric)}
                for system, data in systems.items()
            }
            for metric in shown
        }
        reference = metrics.get("reference") or {} if key == "heldout" else {}
        lines = {
            f"{metric} ({label})": (found, "real words")
            for metric in shown
            if (found := (reference.get("heldout") or {}).get(metric)) is not None
        }
        made[name] = _bar_panels(plt, folder / f"{name}.png", panels, lines)
    likelihood = metrics.get("likelihood") or {}
    if likelihood.get("systems"):
        chance = likelihood.get("chance") or {}
        panels = {
            metric: {system: data.get(metric) for system, data in likelihood["systems"].items()}
            for metric in metric_catalog.names("likelihood")
            if any((d.get(metric) or {}).get("value") is not None for d in likelihood["systems"].values())
        }
        lines = {m: (chance[m], "chance") for m in panels if chance.get(m) is not None}
        made["likelihood"] = _bar_panels(plt, folder / "likelihood.png", panels, lines)
    personality = metrics.get("personality") or {}
    if personality:
        made["personality"] = _personality_plot(plt, folder, personality)
    return made


def _bar_panels(
    plt: Any, path: Path, panels: dict[str, dict[str, Any]], lines: dict[str, tuple[float, str]]
) -> str:
    """One bar chart per panel (system -> estimate dict), with 95% interval error bars where the estimate
    has them and a dashed line at ``lines[panel]`` (value, label: chance, the real words) where given;
    returns the path for the report."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, estimates) in zip(axes[0], panels.items(), strict=True):
        names = list(estimates)
        values = [(estimates[n] or {}).get("value") or 0.0 for n in names]
        bounds = [((estimates[n] or {}).get("low"), (estimates[n] or {}).get("high")) for n in names]
        errors = None
        if all(lo is not None and hi is not None for lo, hi in bounds):
            errors = [
                [max(v - float(lo or 0.0), 0.0) for v, (lo, _) in zip(values, bounds, strict=True)],
                [max(float(hi or 0.0) - v, 0.0) for v, (_, hi) in zip(values, bounds, strict=True)],
            ]
        ax.bar(range(len(names)), values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(names))])
        if title in lines:
            level, label = lines[title]
            ax.axhline(float(level), color="black", linestyle="--", linewidth=1, label=label)
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plots/{path.name}"


def _personality_plot(plt: Any, folder: Path, personality: dict[str, Any]) -> str:
    personas = sorted({p for data in personality.values() for p in data})
    fig, axes = plt.subplots(1, len(personas), figsize=(4.0 * len(personas), 3.0), squeeze=False)
    width = 0.8 / max(len(personality), 1)
    for ax, persona in zip(axes[0], personas, strict=True):
        for index, (system, data) in enumerate(personality.items()):
            traits = data.get(persona, {}).get("traits", {})
            xs = [t + (index - len(personality) / 2 + 0.5) * width for t in range(len(TRAITS))]
            ax.bar(xs, [traits.get(t) or 0.0 for t in TRAITS], width, label=system)
        target = next((d[persona].get("target") for d in personality.values() if persona in d), None) or {}
        ax.scatter(
            [i for i, t in enumerate(TRAITS) if t in target],
            [target[t] for t in TRAITS if t in target],
            marker="_",
            s=300,
            color="black",
            label="target",
        )
        ax.set_xticks(range(len(TRAITS)), TRAITS)
        ax.set_ylim(0, 5.2)
        ax.set_title(persona, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "personality.png", dpi=90)
    plt.close(fig)
    return "plots/personality.png"


# --------------------------------------------------------------------------- rendering


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {entry}" for entry in block[1]] + [""]
        elif kind == "table":
            headers, body = block[1], block[2]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_html(blocks: list[Block], base: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>persllm evaluation</title>',
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(e))}</li>" for e in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2]
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((base / block[1]).read_bytes()).decode("ascii")
            parts.append(f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
