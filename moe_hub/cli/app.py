"""The `moe-hub` command line: a thin typer layer over the Python API.

Each command lives in its own module and is registered here. Errors a user can fix are printed as
one line (`error: ...`) with a non-zero exit code; set MOE_HUB_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any

import typer
from rich.markup import escape

app = typer.Typer(
    name="moe-hub",
    help="Dense Hugging Face models -> Mixture-of-LoRA-Experts: convert, fine-tune, publish.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from moe_hub import __version__

        typer.echo(f"moe-hub {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit", callback=_print_version, is_eager=True)
    ] = False,
) -> None:
    """Dense Hugging Face models -> Mixture-of-LoRA-Experts: convert, fine-tune, publish."""


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into a one-line message and exit code 1 (130 on Ctrl-C)."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from moe_hub.outputs import publish_mark

        mark = publish_mark()
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt as interrupt:
            print(f"error: {interrupted_message(interrupt, mark)}", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as err:
            if os.environ.get("MOE_HUB_DEBUG"):
                raise
            message = " ".join(str(err).split()) or err.__class__.__name__
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(1) from None

    return run


def interrupted_message(interrupt: KeyboardInterrupt, mark: int = 0) -> str:
    """What Ctrl-C left on disk, as found there: a finished output, resumable checkpoints (with
    the command that resumes), or nothing."""
    from moe_hub.errors import Interrupted
    from moe_hub.outputs import published_outputs

    done = published_outputs(since=mark)
    if done:
        return (f"interrupted after {', '.join(map(str, done))} was written completely; it is "
                f"ready to use")
    if isinstance(interrupt, Interrupted):
        command = _resume_command() if interrupt.resume else None
        if command:
            return f"{interrupt.message}; {interrupt.resume} with: {command}"
        return str(interrupt)
    return "interrupted; nothing was written"


def _resume_command() -> str | None:
    """This process's command line with ``--resume`` (in place of any ``--resume-from``)."""
    import shlex

    args = sys.argv[1:]
    if "finetune" not in args:
        return None  # not run as `moe-hub finetune` (e.g. a test runner's own argv)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume-from":
            skip = True
        elif arg != "--resume" and not arg.startswith("--resume-from="):
            kept.append(arg)
    return shlex.join(["moe-hub", *kept, "--resume"])


def register(name: str, command: Callable[..., Any]) -> None:
    app.command(name)(user_errors(command))


from .chat_cmd import chat_command  # noqa: E402
from .convert_cmd import convert_command  # noqa: E402
from .demo_cmd import demo_command  # noqa: E402
from .export_cmd import export_command  # noqa: E402
from .finetune_cmd import finetune_command  # noqa: E402
from .info_cmd import info_command  # noqa: E402
from .push_cmd import push_command  # noqa: E402

register("convert", convert_command)
register("info", info_command)
register("demo", demo_command)
register("finetune", finetune_command)
register("push", push_command)
register("export", export_command)
register("chat", chat_command)


def _escape_help(command: Any) -> None:
    """Help texts show defaults as ``[nf4]``, which typer's rich formatter would read as a markup
    tag and drop: escape every help text so it prints as written."""
    if command.help:
        command.help = escape(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)
    for sub in getattr(command, "commands", {}).values():
        _escape_help(sub)


def build_command() -> Any:
    """The click command behind ``moe-hub`` with its help texts made markup-safe. (typer 0.29
    vendors its own click: ``click`` itself need not be installed, so it is not imported.)"""
    command = typer.main.get_command(app)
    _escape_help(command)
    return command


def main() -> None:
    from moe_hub.progress import quiet_library_notices

    quiet_library_notices()
    build_command()(prog_name="moe-hub")


if __name__ == "__main__":
    main()
