"""Curation stage: annotation records -> validated, deduplicated, split SFT datasets.

``run`` (in ``run.py``) writes ``data/<persona>/sft_train.jsonl``, ``sft_test.jsonl`` and the ``curate``
key of ``stats.json``.
"""

from persllm.curate.run import load_annotations, run

__all__ = ["load_annotations", "run"]
