"""Index stage: embed every stage's chunks once, store them per persona/stage, retrieve within budgets."""

from persllm.index.run import run

__all__ = ["run"]
