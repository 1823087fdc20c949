"""Project commands: ``persllm init`` (a starter project), ``persllm index`` and ``persllm retrieve``."""

import json
import shlex
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer

from persllm.cli.app import ConfigArg, SetOption, WaitOption, app, load, writing
from persllm.config import load_project
from persllm.config.stages import IndexSettings
from persllm.errors import UserError
from persllm.index import run
from persllm.index.retrieve import Retriever
from persllm.persona.character_card import card_project, read_card
from persllm.persona.yields import material_lines

SCAFFOLD = Path(__file__).resolve().parent.parent / "scaffold"


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new project (created if missing).")],
    from_card: Annotated[
        Path | None,
        typer.Option(
            "--from-card",
            help="A Character Card (V2 or V3, JSON or PNG): its persona and corpus instead of the starter's.",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty folder, overwriting same-named files.")
    ] = False,
) -> None:
    """Create a project named after DIRECTORY: a commented persllm.yaml sized for a CPU, and a persona.

    The persona is the starter (one person in two stages, with a small corpus), or the character of
    --from-card: description, personality, scenario and lorebook as knowledge, greetings as the
    character's own words, example messages as dialogue.

    Example: persllm init my-persona
    """

    if not (SCAFFOLD / "persllm.yaml").is_file():
        raise UserError(
            f"{SCAFFOLD}: the starter project is missing from the installed package; reinstall persllm"
        )
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: exists and is not a folder; choose another path")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UserError(
            f"{directory}: folder is not empty; choose a new folder, or pass --force to write the "
            "starter files into it (same-named files are overwritten)"
        )
    card_files = card_starter(from_card) if from_card is not None else None  # a bad card writes nothing
    if card_files is None:
        shutil.copytree(
            SCAFFOLD,
            directory,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs"),
        )
    else:
        for relative, text in card_files.items():
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_text(text, encoding="utf-8")
    config = directory / "persllm.yaml"
    name = project_name(directory)
    text = (SCAFFOLD / "persllm.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("project: my-persona", f"project: {name}", 1), encoding="utf-8")
    project = load_project(config)
    persona = next(iter(project.personas.values()))
    stages = ", ".join(stage.id for stage in persona.stages)
    where = shlex.quote(str(config))
    typer.echo(f"Created persllm project {name!r} in {directory}: persona {persona.id!r}, stages {stages}.")
    typer.echo("Put your person's material under corpus/ and describe them in personas/, then:")
    typer.echo(f"  persllm index {where}")
    typer.echo(
        f"  persllm retrieve {where} {shlex.quote('What keeps you awake at night?')} "
        f"--persona {persona.id} --stage {persona.stages[0].id}"
    )
    typer.echo(f"  persllm run {where}")


def project_name(directory: Path) -> str:
    """The project's name: the folder's, as letters, digits, '-' and '_'."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in directory.resolve().name).strip("-")
    return name or "my-persona"


def card_starter(path: Path) -> dict[str, str]:
    """The persona file and corpus files of a character card, by path within the new project."""
    import yaml

    persona, files = card_project(read_card(path))
    header = f"# Made by `persllm init --from-card {path.name}`: edit freely.\n"
    body = yaml.safe_dump(persona, sort_keys=False, allow_unicode=True, width=100)
    return {f"personas/{persona['id']}.yaml": header + body, **files}


@app.command()
def index(
    config: ConfigArg,
    persona: Annotated[
        list[str] | None, typer.Option("--persona", "-p", help="Index only this persona (repeatable).")
    ] = None,
    wait: WaitOption = False,
    set_options: SetOption = None,
) -> None:
    """Chunk every persona stage's corpus and embed it; unchanged paragraphs are never embedded twice.

    First a seeded share of each stage's style passages (holdout.share) is set aside as held-out
    evaluation references: they are not indexed, so nothing can retrieve or train on them.

    Example: persllm index my-persona/persllm.yaml --persona wren
    """

    project = load(config, set_options)
    with writing(project, "index", wait):
        result = run(
            *IndexSettings.of_project(project),
            personas=persona or None,
            progress=sys.stderr.isatty(),
        )
    columns = [
        "persona", "stage", "chunks", "knowledge", "style", "heldout", "exchanges", "heldout_ex", "embedded",
        "reused",
    ]  # fmt: skip
    rows = [{**row, "heldout_ex": row["heldout_exchanges"]} for row in result["stages"]]
    totals = {key: sum(row[key] for row in rows) for key in columns[2:]}
    typer.echo(table(columns, [*rows, {"persona": "total", "stage": "", **totals}]))
    typer.echo(
        f"index written to {project.layout.index} "
        f"({result['embedded']} chunks embedded, {result['reused']} reused, "
        f"{result['heldout']} style passages and {result['heldout_exchanges']} exchanges held out, "
        f"{result['seconds']:.1f} s)"
    )
    for line in material_lines(project, result["stages"]):
        typer.echo(line)


@app.command()
def retrieve(
    config: ConfigArg,
    query: Annotated[str, typer.Argument(help="What to retrieve context for (e.g. a user question).")],
    stage: Annotated[str, typer.Option("--stage", "-s", help="Stage id of the persona.")],
    persona: Annotated[
        str | None, typer.Option("--persona", "-p", help="Persona id (may be left out when there is one).")
    ] = None,
    seed: Annotated[
        str | None, typer.Option("--seed", help="A chunk (file:line ref or id) to put first in its context.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the contexts as JSON.")] = False,
    set_options: SetOption = None,
) -> None:
    """Show the knowledge and style contexts retrieved for a query, within the word budgets.

    Example: persllm retrieve my-persona/persllm.yaml "Are you afraid of storms?" -p wren -s keeper
    """

    project = load(config, set_options)
    if persona is None:
        if len(project.personas) != 1:
            raise UserError(
                f"--persona: the project has several personas; use one of: {', '.join(project.personas)}"
            )
        persona = next(iter(project.personas))
    context = Retriever.of(project).retrieve(persona, stage, query, seed=seed)
    if as_json:
        typer.echo(json.dumps(context.to_dict(), indent=2, ensure_ascii=False))
        return
    budgets = {
        "knowledge": project.config.retrieval.knowledge_words,
        "style": project.config.retrieval.style_words,
    }
    for kind in ("knowledge", "style"):
        pieces = getattr(context, kind)
        used = sum(piece.words for piece in pieces)
        typer.echo(f"== {kind}: {len(pieces)} pieces, {used}/{budgets[kind]} words ==")
        for piece in pieces:
            marker = "  (seed)" if piece.id == context.seed else ""
            typer.echo(f"[{piece.ref}]  score {piece.score:.3f}{marker}")
            typer.echo(textwrap.fill(piece.text, width=100, initial_indent="  ", subsequent_indent="  "))
        typer.echo("")


def table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A plain text table: text columns left-aligned, numbers right-aligned."""
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    numeric = [all(isinstance(row.get(column), int) for row in rows) for column in columns]

    def line(values: list[str]) -> str:
        return "  ".join(
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(columns), *(line(values) for values in cells)])
