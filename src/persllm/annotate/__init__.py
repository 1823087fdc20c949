"""Annotation stage: user inputs, follow-ups and chain-of-thought golden replies from an annotator LLM.

``persllm.annotate.engine.Annotator`` is the engine (also used by ``pairs`` to regenerate replies);
``run`` plans, resumes and writes ``annotations/<persona>.jsonl``.
"""

from typing import Any


def run(
    project: Any,
    personas: list[str] | None = None,
    stages: list[str] | None = None,
    limit: int | None = None,
    concurrency: int | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Annotate a project; see ``persllm.annotate.stage.run``."""
    # Imported here: persllm.config imports this package for AnnotateConfig, and the stage imports it back.
    from persllm.annotate.stage import run as run_stage

    return run_stage(project, personas, stages, limit, concurrency, dry_run, progress)


__all__ = ["run"]
