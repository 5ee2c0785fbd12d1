"""The `turbofan` command: one entry point above every part of the project."""


class CommandError(Exception):
    """A user error: `turbofan` prints its message on one line and exits 2, without a traceback."""
