"""The one exception type users need to catch."""


class NetshrinkError(ValueError):
    """Invalid settings, data or files. The message is one line and names the offending value."""
