"""`moe-hub push CKPT REPO_ID`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def push_command(
    checkpoint: Annotated[Path, typer.Argument(help="A moe-hub checkpoint directory")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, OWNER/NAME")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private")] = False,
    revision: Annotated[str | None, typer.Option(
        "--revision", help="Branch to push to (created from main when missing)")] = None,
    create_pr: Annotated[bool, typer.Option(
        "--create-pr", help="Open a pull request instead of committing to the branch")] = False,
    commit_message: Annotated[str | None, typer.Option(
        "--commit-message", help="Commit title")] = None,
    endpoint: Annotated[str | None, typer.Option(
        "--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help="Token with write access (default: HF_TOKEN or the stored login)")] = None,
    adapter_only: Annotated[bool, typer.Option(
        "--adapter-only", help="Push experts, routers, config, code and card; no base weights")
    ] = False,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Also upload files matching PATTERN (e.g. 'notes/*'); repeatable. "
                          "Without it only the checkpoint's own files are sent")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only list what would be uploaded (and what is skipped)")] = False,
) -> None:
    """Publish a checkpoint to the Hugging Face Hub in one atomic commit: its config, weights,
    code, tokenizer, card and training record, listed (with their size) before the upload."""
    from moe_hub.hub import push

    url = push(checkpoint, repo_id, private=private, revision=revision, create_pr=create_pr,
               commit_message=commit_message, endpoint=endpoint, token=token,
               adapter_only=adapter_only, include=include, dry_run=dry_run)
    if url is not None:
        typer.echo(url)
