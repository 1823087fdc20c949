"""Generate docs/configuration.md (from the config models), docs/cli.md (from --help), the run-folder
tree in docs/concepts.md (from ``persllm.layout``) and the module map in docs/architecture.md (from
``LAYERS`` and each module's docstring).

``python -m persllm.docgen`` writes them; ``python -m persllm.docgen --check`` exits 1 when one is
stale, which the test suite runs so the reference can never drift from the code.
"""

import ast
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from persllm.cli import app  # the package, so every command is registered
from persllm.config import PersonaConfig, ProjectConfig
from persllm.layout import tree_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs"
PACKAGE = Path(__file__).resolve().parent

# The package's layers, lowest first. A module imports only from its own layer and the layers below it,
# and never in a circle (tests/test_imports.py walks every import to check); the one exception is
# ``ENTRY_POINTS``, which start a command from inside a lower package.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("errors", "schema", "hashing", "interrupts", "bundled", "layout")),
    (
        "settings and shared definitions",
        ("jsonl", "labels", "config", "metric_catalog", "prompting", "stats", "terms"),
    ),
    ("models, material and the manifest", ("manifest", "llm", "persona")),
    ("stage: index", ("index",)),
    ("stage: annotate", ("annotate",)),
    ("stage: curate", ("curate",)),
    ("stage: pairs", ("pairs",)),
    ("stage: train (sft, dpo, export)", ("train",)),
    ("stage: evaluate", ("evaluate",)),
    ("using the models: chat, converse, serve", ("interact",)),
    ("the whole pipeline", ("checks", "pipeline")),
    ("commands", ("cli", "docgen")),
)
ENTRY_POINTS = ("persllm.train.__main__",)


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

    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    return RUN_FOLDER.sub(lambda m: m.group(1) + tree_markdown() + m.group(2), text, count=1)


MODULE_MAP = re.compile(r"(<!-- module-map:[^>]*-->\n).*?(<!-- /module-map -->)", re.DOTALL)


def summary_line(path: Path) -> str:
    """The first sentence of a module's docstring (a package's is its ``__init__.py``'s)."""
    source = path / "__init__.py" if path.is_dir() else path
    docstring = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "." if paragraph else ""


def module_map_markdown() -> str:
    """Every module of the package by layer, lowest first, each with the first sentence of its docstring."""
    lines = []
    for title, names in LAYERS:
        lines += [f"**{title}**", ""]
        for name in names:
            path = PACKAGE / name if (PACKAGE / name).is_dir() else PACKAGE / f"{name}.py"
            shown = f"{name}/" if path.is_dir() else f"{name}.py"
            lines.append(f"- `{shown}` {summary_line(path)}")
            if path.is_dir():
                for module in sorted(path.glob("*.py")):
                    if module.name != "__init__.py":
                        lines.append(f"  - `{module.name}` {summary_line(module)}")
        lines.append("")
    return "\n".join(lines)


def architecture_markdown() -> str:
    """docs/architecture.md with its module map made from ``LAYERS`` and the docstrings."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    return MODULE_MAP.sub(lambda m: m.group(1) + module_map_markdown() + m.group(2), text, count=1)


def expected() -> dict[Path, str]:
    return {
        DOCS / "configuration.md": configuration_markdown(),
        DOCS / "cli.md": cli_markdown(),
        DOCS / "concepts.md": concepts_markdown(),
        DOCS / "architecture.md": architecture_markdown(),
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
