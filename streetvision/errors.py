"""The one exception family that means "bad input": the CLI prints its message as one line, no traceback."""


class StreetVisionError(Exception):
    """Bad input or an unusable artifact; the message says what and where."""
