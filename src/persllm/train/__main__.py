"""``python -m persllm.train sft|dpo CONFIG [--persona P]``: the training commands as a module.

This is what ``accelerate launch --config_file configs/accelerate/ddp.yaml -m persllm.train sft CONFIG``
runs on every process.
"""

import sys

import typer

from persllm.cli.train import train_app
from persllm.errors import UserError


def main() -> None:
    try:
        train_app(prog_name="python -m persllm.train")
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
