"""Command-line interface: thin commands that parse, load the config, call a stage's run, print.

Each module imported below registers its commands on the shared Typer app; then every command is made
to stop cleanly on Ctrl-C and SIGTERM (one line, exit code 130).
"""

import importlib

from persllm.cli.app import app, main, stops_cleanly

# Registration order is the order of `persllm --help`: set-up, the whole pipeline, each stage, the tools.
for _module in ("project", "run", "annotate", "data", "train", "evaluate", "interact", "logs"):
    importlib.import_module(f"persllm.cli.{_module}")

for _typer in [app, *(group.typer_instance for group in app.registered_groups if group.typer_instance)]:
    for _command in _typer.registered_commands:
        if _command.callback is not None:
            _command.callback = stops_cleanly(_command.callback)

__all__ = ["app", "main"]
