"""Errors a user can cause and fix: the CLI prints them as one line and exits with their code (2)."""


class UserError(Exception):
    """A mistake in input or configuration, with the message saying what to fix."""

    exit_code = 2


class PartialStage(UserError):
    """A stage that could not finish all its items, even after a retry (exit code 3)."""

    exit_code = 3
