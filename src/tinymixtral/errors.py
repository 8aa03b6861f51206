"""The project's own error type: bad input at the boundary (files, configs, flags)."""


class TinyMixtralError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2."""
