"""One exception type for user-facing mistakes: the CLI prints its message, never a traceback."""


class AlignError(Exception):
    """A problem the user can fix (bad recipe, bad data, missing file); the message says how."""
