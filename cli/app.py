"""The `moe-hub` command line: a thin typer layer over the Python API.

Each command lives in its own module and is registered here. Errors a user can fix are printed as
one line (`error: ...`) with a non-zero exit code; set MOE_HUB_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer

app = typer.Typer(
    name="moe-hub",
    help="Dense Hugging Face models -> Mixture-of-LoRA-Experts: convert, fine-tune, publish.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into a one-line message and exit code 1 (130 on Ctrl-C)."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            print("error: interrupted; nothing was written", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as err:
            if os.environ.get("MOE_HUB_DEBUG"):
                raise
            message = " ".join(str(err).split()) or err.__class__.__name__
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(1) from None

    return run


def register(name: str, command: Callable[..., Any]) -> None:
    app.command(name)(user_errors(command))


from .convert_cmd import convert_command  # noqa: E402
from .demo_cmd import demo_command  # noqa: E402
from .finetune_cmd import finetune_command  # noqa: E402
from .info_cmd import info_command  # noqa: E402
from .push_cmd import push_command  # noqa: E402

register("convert", convert_command)
register("info", info_command)
register("demo", demo_command)
register("finetune", finetune_command)
register("push", push_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
