"""Evaluation stage: the held-out split answered by every system, scored, judged, and written up.

``run`` (in ``run.py``) writes ``<run_dir>/eval/``; ``report.run`` rebuilds the report from its files.
"""

from persllm.evaluate.run import run

__all__ = ["run"]
