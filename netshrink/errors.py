"""The one exception type users need to catch."""


class NetshrinkError(ValueError):
    """Invalid settings, data or files. The message is one line and names the offending value."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """An exception's message as one line (its type's name when the message is empty, as a
    MemoryError's often is), cut at ``limit`` characters (None: whole)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
