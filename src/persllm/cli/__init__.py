"""Command-line interface: thin commands that parse, load the config, call a stage's run, print.

Each module below registers its commands on the shared Typer app.
"""

from persllm.cli import project  # noqa: F401
from persllm.cli.app import app, main

for _module in ("logs", "annotate", "data", "train", "evaluate", "interact", "run"):
    try:
        __import__(f"persllm.cli.{_module}")
    except ModuleNotFoundError as _exc:  # a command group not written yet
        if _exc.name != f"persllm.cli.{_module}":
            raise

__all__ = ["app", "main"]
