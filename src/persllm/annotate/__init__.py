"""Annotation stage: user inputs, follow-ups and chain-of-thought golden replies from an annotator LLM.

``persllm.annotate.engine.Annotator`` is the engine (also used by ``pairs`` to regenerate replies);
``run`` (in ``run.py``) plans, resumes and writes ``annotations/<persona>.jsonl``.
"""

from persllm.annotate.run import run

__all__ = ["run"]
