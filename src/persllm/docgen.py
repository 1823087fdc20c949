"""Generate docs/configuration.md (from the config models), docs/cli.md (from --help) and the run-folder
tree in docs/concepts.md (from ``persllm.layout``).

``python -m persllm.docgen`` writes them; ``python -m persllm.docgen --check`` exits 1 when one is
stale, which the test suite runs so the reference can never drift from the code.
"""

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from persllm.config import PersonaConfig, ProjectConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if value not in (None, "") else ("`null`" if value is None else "`''`")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_rows(model: type[BaseModel], prefix: str, rows: list[str]) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _section_model(field.annotation)
        type_name = nested.__name__ if nested else _type_name(field.annotation)
        description = (field.description or "").replace("|", "\\|")
        type_cell = type_name.replace("|", "\\|")
        rows.append(f"| `{key}` | {type_cell} | {_default(field)} | {description} |")
        if nested is not None and typing.get_origin(field.annotation) is not dict:
            suffix = "[]." if typing.get_origin(field.annotation) is list else "."
            _model_rows(nested, key + suffix, rows)


def configuration_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config models by `python -m persllm.docgen`; do not edit by hand.",
        "Unknown keys are errors. Precedence: defaults < YAML < `--set key.path=value` < dedicated flags.",
        "",
    ]
    for title, model in (("Project file: `persllm.yaml`", ProjectConfig), ("Persona file", PersonaConfig)):
        rows: list[str] = []
        _model_rows(model, "", rows)
        lines += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def _walk(command: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    found = [(path, command)]
    if hasattr(command, "commands"):
        for name in sorted(command.commands):
            found += _walk(command.commands[name], [*path, name])
    return found


def cli_markdown() -> str:
    import typer

    import persllm.cli  # noqa: F401  (registers the commands)
    from persllm.cli.app import app

    root = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from `--help` by `python -m persllm.docgen`; do not edit.", ""]
    for path, command in _walk(root, ["persllm"]):
        context = command.context_class(
            command, info_name=" ".join(path), terminal_width=100, max_content_width=100
        )
        lines += [f"## `{' '.join(path)}`", "", "```text", command.get_help(context).rstrip(), "```", ""]
    return "\n".join(lines)


RUN_FOLDER = re.compile(r"(<!-- run-folder:[^>]*-->\n).*?(<!-- /run-folder -->)", re.DOTALL)


def concepts_markdown() -> str:
    """docs/concepts.md with its run-folder block made from ``persllm.layout.TREE``."""
    from persllm.layout import tree_markdown

    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    return RUN_FOLDER.sub(lambda m: m.group(1) + tree_markdown() + m.group(2), text, count=1)


def expected() -> dict[Path, str]:
    return {
        DOCS / "configuration.md": configuration_markdown(),
        DOCS / "cli.md": cli_markdown(),
        DOCS / "concepts.md": concepts_markdown(),
    }


def main(argv: list[str]) -> int:
    stale = []
    for path, text in expected().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(path)
            if "--check" not in argv:
                path.write_text(text, encoding="utf-8")
    if "--check" in argv and stale:
        names = ", ".join(p.name for p in stale)
        print(f"stale docs: {names}; run `make docs` (python -m persllm.docgen) and commit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
