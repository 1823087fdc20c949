"""Command-line interface: thin commands that parse, load the config, call a stage's run, print.

Each module imported below registers its commands on the shared Typer app; then every command is made
to stop cleanly on Ctrl-C and SIGTERM (one line, exit code 130).
"""

import importlib
import os
import signal
import sys
import warnings

import typer

from persllm import interrupts
from persllm.cli.app import app, stopped, stops_cleanly, terminate
from persllm.errors import UserError

# Registration order is the order of `persllm --help`: set-up, the whole pipeline, each stage, the tools.
for _module in ("project", "run", "annotate", "data", "train", "evaluate", "interact", "logs"):
    importlib.import_module(f"persllm.cli.{_module}")

for _typer in [app, *(group.typer_instance for group in app.registered_groups if group.typer_instance)]:
    for _command in _typer.registered_commands:
        if _command.callback is not None:
            _command.callback = stops_cleanly(_command.callback)


def main() -> None:
    """Console entry point: user errors are one line on stderr and exit code 2."""
    # The libraries' own bars (weight loading, GGUF conversion, dataset maps) bury persllm's progress
    # lines; set either variable to 0 to see them again.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # Renames inside transformers that its own callers (peft, trl) have not caught up with yet.
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    interrupts.watch_sigint()
    signal.signal(signal.SIGTERM, terminate)
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        stopped()


__all__ = ["app", "main"]
