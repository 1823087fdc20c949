"""Command-line interface: thin commands that parse, load the config, call a stage's run, print.

Each module imported below registers its commands on the shared Typer app.
"""

import importlib

from persllm.cli.app import app, main

# Registration order is the order of `persllm --help`: set-up, the whole pipeline, each stage, the tools.
for _module in ("project", "run", "annotate", "data", "train", "evaluate", "interact", "logs"):
    importlib.import_module(f"persllm.cli.{_module}")

__all__ = ["app", "main"]
