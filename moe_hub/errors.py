"""The one exception type for bad input: the CLI prints its message as a single line."""


class MoEHubError(Exception):
    """A user-facing error whose message says what went wrong and how to fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what it left on disk: the CLI prints ``message`` instead of the generic line.
    ``resume`` (e.g. "resume from checkpoint-6") says that the run continues with ``--resume``;
    the CLI completes it with the exact command."""

    def __init__(self, message: str, resume: str | None = None) -> None:
        super().__init__(f"{message}; {resume} with --resume" if resume else message)
        self.message = message
        self.resume = resume
