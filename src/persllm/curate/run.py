"""``persllm curate``: annotation records -> validated, deduplicated, split SFT datasets.

``run`` writes ``data/<persona>/sft_train.jsonl``, ``sft_test.jsonl`` and the ``curate`` key of
``stats.json``.
"""

import time
from typing import TYPE_CHECKING, Any

from persllm.annotate.prompts import PROMPTS
from persllm.config import EmbedderConfig, Workspace
from persllm.config.stages import CurateSettings
from persllm.curate.dedup import COSINE_TOLERANCE, dedup
from persllm.curate.filters import REAL_SOURCES, check_record, prompt_word_spans, reply_source
from persllm.curate.format import sft_row
from persllm.curate.split import read_general, split_records, training_mix
from persllm.curate.stats import CurateCounts, update_stats
from persllm.errors import UserError
from persllm.index.encoder import embed
from persllm.jsonl import read_jsonl, write_jsonl
from persllm.manifest import record_stage

if TYPE_CHECKING:
    import numpy as np

    from persllm.config import PersonaConfig

KIND_ORDER = {"ordinary": 0, "misleading": 1, "opinion": 2}
TOTALS = ("input", "kept", "train_rows", "test_rows", "general_rows")


def run(settings: CurateSettings, workspace: Workspace, personas: list[str] | None = None) -> dict[str, Any]:
    """Curate the annotations of ``personas`` (default: all).

    Returns:
        Totals (``input``, ``kept``, ``train_rows``, ``test_rows``, ``general_rows``) and, under
        ``personas``, each persona's ``stats.json`` entry.
    """

    cfg = settings.curate
    seed = settings.seed
    started = time.monotonic()
    persona_ids = list(dict.fromkeys(personas or workspace.personas))

    # Inputs: every annotation file and the general data are read and checked before anything is written.
    general = (
        read_general(workspace.root / cfg.general_data) if cfg.general_data and cfg.general_ratio > 0 else []
    )
    loaded = {pid: load_annotations(workspace, pid) for pid in persona_ids}
    spans = prompt_word_spans(annotator_templates())

    summary: dict[str, Any] = {}
    verdicts: list[str] = []
    for persona_id, records in loaded.items():
        persona = workspace.persona(persona_id)
        counts = CurateCounts()

        # Validation: each record is counted under the first check it fails.
        stage_ids = {stage.id for stage in persona.stages}
        valid = []
        for record in records:
            stage, kind = str(record.get("stage")), str(record.get("kind", "ordinary"))
            counts.add(stage, kind, "input")
            reason = check_record(record, cfg, stage_ids, spans)
            if reason:
                counts.add(stage, kind, reason)
            else:
                valid.append({**record, "persona": persona_id, "kind": kind})

        # Back-written questions must be on the passage's topic; then near-duplicate inputs within the
        # persona, across stages: the first in priority order survives.
        valid.sort(key=lambda r: priority(r, persona))
        unique = valid
        if valid:
            vectors = embed([asked(r) for r in valid], settings.embedder)
            on_topic = topical(valid, vectors, cfg.question_similarity_min, settings.embedder)
            for record in (r for r, ok in zip(valid, on_topic, strict=True) if not ok):
                counts.add(record["stage"], record["kind"], "off_topic")
            grounded = grounding(valid, cfg.grounding_min, settings.embedder)
            for record in (
                r for r, ok, topic in zip(valid, grounded, on_topic, strict=True) if topic and not ok
            ):
                counts.add(record["stage"], record["kind"], "ungrounded")
            on_topic &= grounded
            valid = [r for r, ok in zip(valid, on_topic, strict=True) if ok]
            keep = dedup(vectors[on_topic], cfg.dedup_threshold)
            unique = [r for r, kept in zip(valid, keep, strict=True) if kept]
            for record, kept in zip(valid, keep, strict=True):
                counts.add(record["stage"], record["kind"], "kept" if kept else "duplicate")

        # An annotator that cannot write this persona stops the run here, before anything trains on it.
        written = [r for r in records if reply_source(r) == "annotator"]
        kept_written = [r for r in valid if reply_source(r) == "annotator"]
        verdict = annotator_verdict(persona_id, settings, len(written), len(kept_written), counts)
        if verdict:  # every persona is still checked and counted, so the stats say all there is
            update_stats(workspace.layout.stats(persona_id), "curate", counts.summary(0, 0, 0))
            verdicts.append(verdict)
            continue

        # Split the deduplicated records (stratified by stage and kind; the person's own words and real
        # exchanges always train, their test is the held-out passages and exchanges), then render and mix.
        own = [r for r in unique if reply_source(r) in REAL_SOURCES]
        train, test = split_records(
            [r for r in unique if reply_source(r) not in REAL_SOURCES], cfg.test_fraction, seed
        )
        train += own
        for side, side_records in (("train", train), ("test", test)):
            for record in side_records:
                counts.add(record["stage"], record["kind"], side)
        train_rows, n_general = training_mix(
            [sft_row(r, persona, cfg.cot, cfg.system_prompt) for r in train],
            cfg.repeat,
            general,
            cfg.general_ratio,
            seed,
            persona_id,
        )
        test_rows = [sft_row(r, persona, cfg.cot, cfg.system_prompt) for r in test]

        # Write: data files atomically, then the stats that describe them.
        layout = workspace.layout
        write_jsonl(layout.sft_train(persona_id), train_rows)
        write_jsonl(layout.sft_test(persona_id), test_rows)
        stats = counts.summary(len(train_rows), n_general, len(test_rows))
        stats.update({"repeat": cfg.repeat, "cot": cfg.cot, "system_prompt": cfg.system_prompt, "seed": seed})
        update_stats(layout.stats(persona_id), "curate", stats)
        summary[persona_id] = stats

    if verdicts:
        others = len(verdicts) - 1
        more = f" (and {others} more persona{'s' if others > 1 else ''} like it)" if others else ""
        raise UserError(verdicts[0] + more)

    # Manifest: what curation did; `persllm run` keeps its own fingerprint of the stage.
    totals = {key: sum(stats[key] for stats in summary.values()) for key in TOTALS}
    complete = set(persona_ids) == set(workspace.personas)
    record_stage(
        workspace,
        "curate",
        status="done" if complete else "partial",
        seconds=round(time.monotonic() - started, 3),
        counts=totals,
    )
    return {**totals, "personas": summary}


def asked(record: dict[str, Any]) -> str:
    """The user turn that dedup compares: a real exchange's last (its window may share earlier turns with
    the exchange before it), else the first (what the dialogue is about)."""
    return str(record["turns"][-2 if reply_source(record) == "dialogue" else 0]["content"])


def annotator_templates() -> list[str]:
    """The text of every annotator prompt template (what no training turn may repeat)."""

    return [path.read_text(encoding="utf-8") for path in sorted(PROMPTS.glob("*.txt"))]


def annotator_verdict(
    persona_id: str, settings: CurateSettings, written: int, kept: int, counts: CurateCounts
) -> str | None:
    """The one line that stops the run when too few annotator-written dialogues survive, or None."""
    minimum = settings.curate.annotator_min_kept
    if written == 0 or kept >= minimum * written:
        return None
    removed = counts.summary(0, 0, 0)["removed"]
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(removed.items(), key=lambda x: -x[1]) if n)
    return (
        f"annotator {settings.annotator.model}: only {kept} of {written} dialogues it wrote for "
        f"{persona_id!r} passed the checks ({reasons}), under curate.annotator_min_kept {minimum}; nothing "
        "was trained. Use a stronger annotator, add the person's own words (style) or real exchanges "
        "(dialogue), or set annotate.counts to what your own words cover"
    )


def grounding(records: list[dict[str, Any]], minimum: float, embedder: EmbedderConfig) -> "np.ndarray":
    """Keep mask: False for annotator replies less similar to their retrieved context than ``minimum``."""
    import numpy as np

    mask = np.ones(len(records), dtype=bool)
    written = [i for i, r in enumerate(records) if reply_source(r) == "annotator" and context_text(r)]
    if written:
        replies = embed(
            [" ".join(t["content"] for t in records[i]["turns"][1::2]) for i in written],
            embedder,
        )
        contexts = embed([context_text(records[i]) for i in written], embedder)
        mask[written] = np.sum(replies * contexts, axis=1) >= minimum - COSINE_TOLERANCE
    return mask


def context_text(record: dict[str, Any]) -> str:
    context = record.get("context") or {}
    return str(context.get("knowledge") or "") if isinstance(context, dict) else ""


def topical(
    records: list[dict[str, Any]], questions: "np.ndarray", minimum: float, embedder: EmbedderConfig
) -> "np.ndarray":
    """Keep mask: False for own-words records whose question-passage cosine is below ``minimum``."""
    import numpy as np

    mask = np.ones(len(records), dtype=bool)
    own = [i for i, r in enumerate(records) if reply_source(r) == "own_words"]
    if own:
        passages = embed([records[i]["turns"][1]["content"] for i in own], embedder)
        cosines = np.sum(questions[own] * passages, axis=1)
        mask[own] = cosines >= minimum - COSINE_TOLERANCE
    return mask


def load_annotations(workspace: Workspace, persona_id: str) -> list[dict[str, Any]]:
    """The annotation records of one persona; a missing file is a UserError saying to annotate first."""
    workspace.persona(persona_id)
    path = workspace.layout.dialogues(persona_id)
    if not path.exists():
        raise UserError(f"{path}: no annotations for persona {persona_id!r}; run `persllm annotate` first")
    return read_jsonl(path)


def priority(record: dict[str, Any], persona: "PersonaConfig") -> tuple[int, int, str, str]:
    """Deterministic order deciding which member of a duplicate group is kept: earlier stage, kind, id."""
    stage_index = [s.id for s in persona.stages].index(record["stage"])
    return (stage_index, KIND_ORDER.get(record["kind"], len(KIND_ORDER)), record["kind"], record["id"])
