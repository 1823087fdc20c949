"""Preference-pair stage: curated training records -> ``data/<persona>/dpo_train.jsonl``.

``run`` (in ``run.py``) builds the pairs; ``build.py`` and ``sources.py`` are its pure parts.
"""

from persllm.pairs.run import run

__all__ = ["run"]
