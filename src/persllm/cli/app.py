"""The Typer application and the shared pieces of every command: CONFIG, --set, error handling."""

import os
import sys
import warnings
from typing import Annotated, Any

import typer

from persllm import __version__
from persllm.errors import UserError

app = typer.Typer(
    name="persllm",
    help="Turn what is known about a person into a personified LLM.\n\n"
    "Example: persllm init my-persona && persllm index my-persona/persllm.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

ConfigArg = Annotated[str, typer.Argument(help="Project file (persllm.yaml) or the folder holding it.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set annotate.counts.ordinary=8 (repeatable)."),
]


def load(config: str, set_options: list[str] | None = None, preset: str | None = None, **flags: Any) -> Any:
    """Load the project with precedence defaults < YAML < preset < --set < dedicated flags."""
    from persllm.config import load_project, parse_set_options

    overrides = parse_set_options(set_options)
    overrides.update({key: value for key, value in flags.items() if value is not None})
    return load_project(config, overrides, preset)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"persllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Turn what is known about a person into a personified LLM."""


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
    import persllm.cli  # noqa: F401  (registers the commands)

    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; everything finished so far is saved, re-run to continue", err=True)
        sys.exit(130)
