"""The one exception type for bad input: the CLI prints its message as a single line."""


class MoEHubError(Exception):
    """A user-facing error whose message says what went wrong and how to fix it."""
