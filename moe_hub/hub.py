"""Publish a moe-hub checkpoint to the Hugging Face Hub in one atomic commit.

Everything that can be checked locally (repo id, checkpoint layout, token) is checked before the
first request. All traffic goes through ``huggingface_hub.HfApi``: ``create_repo``, then
``create_branch`` when a missing branch is named, then ONE ``create_commit`` with a
``CommitOperationAdd`` per file. ``upload_folder`` is avoided on purpose: with ``hf_xet``
installed it may split a folder into several commits, and a failed push must leave the repository
exactly as it was.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import (
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    INDEX_FILE,
    checkpoint_files,
    left_out,
    read_checkpoint_config,
    read_weight_map,
)
from .errors import MoEHubError
from .model_card import README_FILE, looks_like_hub_id, render_model_card
from .safetensors_io import read_header

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def validate_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` or raise MoEHubError naming the expected OWNER/NAME form."""
    bad = (
        not isinstance(repo_id, str)
        or not _REPO_ID.match(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith((".git", ".", "-"))
    )
    if bad:
        raise MoEHubError(
            f"malformed repo id {repo_id!r}: use OWNER/NAME with letters, digits, '-', '_' or '.' "
            f"(e.g. alice/smollm2-moe)"
        )
    return repo_id


def resolve_token(token: str | None) -> str:
    """The token from the argument, else HF_TOKEN, else the stored login; never printed."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise MoEHubError(
            "no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login` "
            "(pushing needs a token with write access)"
        )
    return token


@dataclass
class UploadPlan:
    """What a push sends: repository path -> bytes (generated) or Path (copied as is), and what
    lies in the checkpoint folder but is left out."""

    files: dict[str, bytes | Path]
    skipped: list[str] = field(default_factory=list)

    def size(self, rel: str) -> int:
        source = self.files[rel]
        return len(source) if isinstance(source, bytes) else source.stat().st_size

    def describe(self, repo_id: str) -> list[str]:
        """The listing printed before anything is sent."""
        total = sum(self.size(rel) for rel in self.files)
        lines = [f"{len(self.files)} files ({_human(total)}) for {repo_id}:"]
        lines += [f"  {rel}  {_human(self.size(rel))}" for rel in sorted(self.files)]
        if self.skipped:
            lines.append(f"skipped, not part of the checkpoint (add with --include PATTERN): "
                         f"{', '.join(self.skipped)}")
        return lines


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError  # unreachable


def _refuse_outside_links(checkpoint: Path, files: list[str]) -> None:
    """A file that is (or lies below) a symlink resolving outside the checkpoint would publish
    whatever it points to: refuse, naming it."""
    root = checkpoint.resolve()
    for rel in files:
        target = (checkpoint / rel).resolve()
        if root not in target.parents:
            raise MoEHubError(f"{checkpoint / rel} is a symbolic link to {target}, outside the "
                              f"checkpoint: replace it with the file itself, or remove it")


def _check_weights(checkpoint: Path, files: list[str], weight_map: dict[str, str]) -> None:
    """Every safetensors file has a sound header and exactly the size it describes, and holds
    the tensors the index places in it: a truncated file is refused before any commit."""
    headers = {}
    for rel in files:
        if rel.endswith(".safetensors"):
            header, _ = read_header(checkpoint / rel)
            headers[rel] = header
    for tensor, rel in weight_map.items():
        if rel in headers and tensor not in headers[rel]:
            raise MoEHubError(f"{checkpoint / INDEX_FILE} places {tensor} in {rel}, which does "
                              f"not hold it: re-create the checkpoint with `moe-hub convert`")


def plan_upload(
    checkpoint: Path, repo_id: str, adapter_only: bool = False,
    include: list[str] | None = None,
) -> UploadPlan:
    """What to upload, checked: the checkpoint's own files (see ``checkpoint_files``) plus
    those matching an ``include`` pattern, none a link out of the folder, every weight file
    sound. The model card is re-rendered for ``repo_id``. ``adapter_only`` leaves out the base
    shards and rewrites config.json and the index for an adapter-only checkpoint.
    """
    from .export import export_upload_plan, is_export

    if is_export(checkpoint):  # a native MoE model written by `moe-hub export`
        plan = export_upload_plan(checkpoint, repo_id, adapter_only, include)
        index = checkpoint / INDEX_FILE
        weight_map = read_weight_map(index, "the export", "export again") \
            if index.is_file() else {}
        copied = [rel for rel, source in plan.items() if isinstance(source, Path)]
        _refuse_outside_links(checkpoint, copied)
        _check_weights(checkpoint, copied, weight_map)
        return UploadPlan(plan, left_out(checkpoint, list(plan)))
    config = read_checkpoint_config(checkpoint)
    index = checkpoint / INDEX_FILE
    weight_map = read_weight_map(index, "the checkpoint", "re-create it with `moe-hub convert`") \
        if index.is_file() else {}
    missing = sorted({name for name in weight_map.values() if not (checkpoint / name).is_file()})
    if missing:
        raise MoEHubError(f"{checkpoint} lacks {missing[0]} named in {INDEX_FILE}: the checkpoint "
                          f"is incomplete; re-create it with `moe-hub convert`")
    if not (checkpoint / ADAPTER_WEIGHTS).is_file():
        raise MoEHubError(f"{checkpoint} has no {ADAPTER_WEIGHTS}: re-create it with "
                          f"`moe-hub convert`")
    files = checkpoint_files(checkpoint, include)
    plan: dict[str, bytes | Path] = {rel: checkpoint / rel for rel in files}
    if adapter_only or config.get("adapter_only"):
        base = config.get("base_model_name_or_path")
        if not looks_like_hub_id(base):
            raise MoEHubError(
                f"an adapter-only repository must name a base model on the Hub, but this "
                f"checkpoint's base is {base!r}: convert from a Hub id, or push without "
                f"--adapter-only"
            )
    if adapter_only and not config.get("adapter_only"):
        base_shards = {name for name in weight_map.values() if name != ADAPTER_WEIGHTS}
        for name in base_shards:
            plan.pop(name, None)
        config = {**config, "adapter_only": True}
        adapters = {key: name for key, name in weight_map.items() if name == ADAPTER_WEIGHTS}
        index_data = {"metadata": {"total_size": (checkpoint / ADAPTER_WEIGHTS).stat().st_size},
                      "weight_map": dict(sorted(adapters.items()))}
        plan[INDEX_FILE] = (json.dumps(index_data, indent=2) + "\n").encode()
        plan[CONFIG_FILE] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    card = render_model_card(checkpoint, config=config, repo_id=repo_id)
    plan[README_FILE] = str(card).encode()
    copied = [rel for rel, source in plan.items() if isinstance(source, Path)]
    _refuse_outside_links(checkpoint, copied)
    _check_weights(checkpoint, copied, weight_map)
    return UploadPlan(plan, left_out(checkpoint, files))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level failures of whichever HTTP stack this huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _http_failure(err: Exception, repo_id: str, endpoint: str) -> MoEHubError:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    where = f"{repo_id} at {endpoint}"
    if status == 401:
        return MoEHubError(f"the Hub refused the token (HTTP 401) for {where}: pass a valid "
                           f"--token or set HF_TOKEN")
    if status == 403:
        return MoEHubError(f"no write access to {where} (HTTP 403): use a token with write "
                           f"permission for {repo_id.split('/')[0]}")
    if status == 404:
        return MoEHubError(f"not found (HTTP 404) while pushing to {where}: check the repo id "
                           f"and --revision")
    if status is not None and status >= 500:
        return MoEHubError(f"the Hub failed (HTTP {status}) while pushing to {where}; the commit "
                           f"is atomic, so nothing was changed: retry the push")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return MoEHubError(f"push to {where} failed (HTTP {status}): {detail}")


def push(
    checkpoint: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    adapter_only: bool = False,
    include: list[str] | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> str | None:
    """Push ``checkpoint`` to ``repo_id`` in one commit; return the commit URL (the pull request
    URL with ``create_pr``), or None with ``dry_run``.

    Only what the checkpoint consists of is sent (config, the weights its index names, code,
    tokenizer, card, training record); other files in the folder are listed as skipped unless
    they match an ``include`` pattern (``"notes/*"``, ``"eval.json"``). The list of files and
    their total size is printed to stderr first (unless ``progress`` is False); ``dry_run``
    stops there, before any token is needed or request made.

    ``revision`` names a branch (created from main when missing); ``adapter_only`` uploads only
    experts, routers, config, code and card, and loading fetches the base named in the config.

    Example::

        from moe_hub import push
        push("smol-moe", "alice/smol-moe", private=True)
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    validate_repo_id(repo_id)
    path = Path(checkpoint)
    try:
        plan = plan_upload(path, repo_id, adapter_only=adapter_only, include=include)
    except ValueError as err:  # NotACheckpointError and a corrupt training record
        raise MoEHubError(str(err)) from None
    if not dry_run:
        token = resolve_token(token)
    if progress or dry_run:
        print("\n".join(plan.describe(repo_id)), file=sys.stderr)
    if dry_run:
        return None
    api = HfApi(endpoint=endpoint, token=token)
    endpoint = api.endpoint
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=source if isinstance(
        source, bytes) else str(source)) for rel, source in sorted(plan.files.items())]
    message = commit_message or ("Upload MoE-LoRA adapters with moe-hub" if adapter_only
                                 else "Upload MoE-LoRA model with moe-hub")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as err:
        raise _http_failure(err, repo_id, endpoint) from None
    except _transport_errors() as err:
        raise MoEHubError(
            f"lost the connection to {endpoint} while pushing {repo_id} "
            f"({err.__class__.__name__}); the commit is atomic, so the repository has either all "
            f"of this push or none of it: retry the push"
        ) from None
    except ValueError as err:  # invalid README metadata reported by the Hub
        raise MoEHubError(f"the Hub rejected the push to {repo_id}: {err}".splitlines()[0]) \
            from None
    return info.pr_url or info.commit_url


__all__ = ["UploadPlan", "plan_upload", "push", "resolve_token", "validate_repo_id"]
