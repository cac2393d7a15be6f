"""Errors that are the user's to fix: the CLI prints them as one line, never a traceback."""


class VQCError(Exception):
    """A user mistake or bad input: shown as one readable line, exit code 2."""
