"""``persllm chat``, ``persllm converse`` and ``persllm serve``."""

from pathlib import Path
from typing import Annotated

import typer

from persllm.cli.app import ConfigArg, SetOption, app, load
from persllm.interact import chat as chat_module
from persllm.interact import converse as converse_module


@app.command()
def chat(
    config: ConfigArg,
    persona: Annotated[str, typer.Option("--persona", help="Persona id to talk to.")],
    stage: Annotated[
        str | None, typer.Option("--stage", help="Stage id; default the persona's last.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="sft, dpo, prompt (base model, no adapter) or an adapter folder; default dpo, else sft.",
        ),
    ] = None,
    show_analysis: Annotated[
        bool | None, typer.Option("--show-analysis/--hide-analysis", help="Print the model's analysis first.")
    ] = None,
    retrieval: Annotated[
        bool | None,
        typer.Option("--retrieval/--no-retrieval", help="Add retrieved persona material to the prompt."),
    ] = None,
    set_options: SetOption = None,
) -> None:
    """Chat with a persona model in the terminal, replies streamed.

    Commands: /stage S, /analysis on|off, /reset, /save FILE (.md or .json), /help, /quit.

    Example: persllm chat examples/demo/persllm.yaml --persona elsie --stage keeper --show-analysis
    """

    project = load(config, set_options)
    chat_module.run(project, persona, stage, model, show_analysis, retrieval)


@app.command()
def converse(
    config: ConfigArg,
    personas: Annotated[
        str,
        typer.Option(
            "--personas",
            help="Comma-separated agents: persona ids, persona:stage[:variant] ids or converse.agents keys.",
        ),
    ],
    scenario: Annotated[str, typer.Option("--scenario", help="What the conversation is about.")],
    turns: Annotated[int, typer.Option("--turns", min=1, help="Replies in total.")] = 6,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder; default <run_dir>/converse/<scenario>-<hash>."),
    ] = None,
    order: Annotated[str, typer.Option("--order", help="round-robin or random (seeded).")] = "round-robin",
    set_options: SetOption = None,
) -> None:
    """Let persona models talk to each other and measure stance, coverage and flattery.

    Writes transcript.jsonl, transcript.md and measures.json.

    Example: persllm converse examples/demo/persllm.yaml --personas elsie,jonah --scenario "A new harbour?"
    """

    project = load(config, set_options)
    agents = [name.strip() for name in personas.split(",") if name.strip()]

    def show(row: dict[str, object]) -> None:
        typer.echo(f"{row['name']}: {row['text']}\n")

    folder = converse_module.run(project, agents, scenario, turns, out, order, on_turn=show)
    typer.echo(f"wrote {folder}/transcript.jsonl, transcript.md and measures.json")


@app.command()
def serve(
    config: ConfigArg,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to bind; default serve.host (127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port; default serve.port (8000).")] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", help="Env var holding the bearer token clients must send.")
    ] = None,
    set_options: SetOption = None,
) -> None:
    """Serve every persona model over an OpenAI-compatible API, with a web chat page at /.

    Model ids are persona:stage:variant (variant sft, dpo or prompt) and base; send
    "show_analysis": true (or append +analysis to the model id) to get the analysis as reasoning_content.

    Example: persllm serve examples/demo/persllm.yaml --port 8000 --api-key-env PERSLLM_API_KEY
    """

    project = load(config, set_options)
    from persllm.interact import serve as serve_module  # defers fastapi

    serve_module.run(project, host, port, api_key_env)
