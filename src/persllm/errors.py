"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in input or configuration, with the message saying what to fix."""
