"""The project's own error type: bad input at the boundary (files, configs, flags)."""


class TinyMixtralError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with status 2."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name if it has none), cut to `limit` characters: what a
    one-line report quotes of a library's many-page error (torch.compile's, say)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
