"""One exception type for user-facing problems: the CLI prints its message on one line and exits 2."""


class DraftGuideError(Exception):
    """Bad input or an unusable model/checkpoint. The message is meant for the user, not a traceback."""
