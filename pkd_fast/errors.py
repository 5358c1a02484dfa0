"""One exception type for bad input, so the CLI can print it as a single line instead of a traceback."""


class PkdError(Exception):
    """A user-facing error: the message says what was wrong, where, and what was expected."""
