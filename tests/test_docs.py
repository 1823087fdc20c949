"""The generated references (docs/configuration.md, docs/cli.md) must match the code."""

from persllm import docgen


def test_generated_docs_are_current() -> None:
    for path, text in docgen.expected().items():
        assert path.exists(), f"{path} missing; run `make docs`"
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale; run `make docs` and commit"


def test_every_command_help_has_an_example() -> None:
    cli = docgen.cli_markdown()
    sections = [s for s in cli.split("## `")[1:] if "Commands:" not in s]
    assert sections
    for section in sections:
        assert "Example" in section, section.splitlines()[0]
