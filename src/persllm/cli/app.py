"""The Typer application and the shared pieces of every command: CONFIG, --set, error handling."""

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from persllm import __version__, interrupts
from persllm.config import load_project, parse_set_options
from persllm.layout import project_lock
from persllm.manifest import write_manifest

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
WaitOption = Annotated[
    bool,
    typer.Option(
        "--wait", help="If another command is writing to this run folder, wait for it instead of stopping."
    ),
]


@contextmanager
def writing(project: Any, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the run folder's lock while ``command`` writes to it (a second writer stops, or waits); the
    manifest's config is refreshed first."""

    with project_lock(project.layout, command, wait):
        write_manifest(project)
        yield


def load(config: str, set_options: list[str] | None = None, preset: str | None = None, **flags: Any) -> Any:
    """Load the project with precedence defaults < YAML < preset < --set < dedicated flags."""

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


def stopped() -> NoReturn:
    """Say the run was stopped and leave now (exit code 130).

    Worker threads still computing (llama.cpp slots, a generate call) would hold a normal exit until they
    finish; everything that matters is on disk already (each record, call and manifest entry is written
    the moment it is complete), so the process ends without waiting for them.
    """
    typer.echo("interrupted; everything finished so far is saved, re-run to continue", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def stops_cleanly(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command that answers Ctrl-C and SIGTERM with ``stopped()`` (click would print "Aborted!")."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            stopped()

    return wrapper


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops like Ctrl-C: the same message, the same records."""

    interrupts.request_stop()
    raise KeyboardInterrupt
