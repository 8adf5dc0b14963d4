"""What moe-hub takes for a Hugging Face Hub repository id rather than a local path."""

from __future__ import annotations

import re
from pathlib import Path

# "name" or "owner/name": word characters, '.' and '-', at most 96 each (the Hub's limit), and
# starting with a letter or digit, which no relative path written as ./x, ../x or ~/x does.
_HUB_ID = re.compile(r"^(?=[A-Za-z0-9])(?:[\w.-]{1,96}/)?[\w.-]{1,96}$")


def is_hub_id(text: str | None, owner_required: bool = False) -> bool:
    """Whether ``text`` has the shape of a Hub repository id (``owner/name`` only when
    ``owner_required``). Shape only: whether a local path of that name exists is the caller's
    question."""
    if not text or not _HUB_ID.match(text):
        return False
    return "/" in text or not owner_required


def _network_cause(err: BaseException) -> BaseException | None:
    """The connection-level failure behind ``err`` (itself or in its cause chain), if any.
    huggingface_hub reports one as LocalEntryNotFoundError when nothing is cached, with the
    transport error (httpx/requests ConnectError, a timeout) as its cause."""
    seen: set[int] = set()
    current: BaseException | None = err
    found = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        module = type(current).__module__.split(".")[0]
        if isinstance(current, ConnectionError | TimeoutError) or (
                module in ("httpx", "httpcore", "requests", "urllib3") and any(
                    word in type(current).__name__ for word in ("Connect", "Timeout", "Network",
                                                                "Transport", "Protocol"))):
            return current
        if type(current).__name__ == "LocalEntryNotFoundError":
            found = current
        current = current.__cause__ or current.__context__
    return found


def unreachable_hub_error(err: BaseException, what: str) -> Exception | None:
    """A one-line MoEHubError when ``err`` means the Hub could not be reached (no network, name
    resolution failed, connection refused, timeout) while fetching ``what``; else None."""
    cause = _network_cause(err)
    if cause is None:
        return None
    from huggingface_hub import constants

    from .errors import MoEHubError

    reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
    if type(cause).__name__ == "LocalEntryNotFoundError":
        reason = "nothing cached to fall back on"
    return MoEHubError(f"cannot reach the Hub at {constants.ENDPOINT} to fetch {what} "
                       f"({type(cause).__name__}: {reason}): check the network connection or "
                       f"HF_ENDPOINT, or pass a local directory")


def download_snapshot(repo_id: str, revision: str | None, patterns: list[str], *, kind: str,
                      role: str) -> Path:
    """``snapshot_download`` of the files matching ``patterns``, with moe-hub's one-line errors:
    a missing (or private) repository names it as a ``kind`` ("model", "adapter"), an
    unreachable Hub says so for the ``role`` it plays ("BASE", "adapter")."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    from .errors import MoEHubError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise MoEHubError(f"no {kind} {repo_id!r} on the Hub (or it is private: log in with "
                          f"`hf auth login` or set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as err:
        name = repo_id if role == "BASE" else f"{role} {repo_id}"
        raise unreachable_hub_error(err, f"{role} {repo_id}") or MoEHubError(
            f"could not download {name}: {err}") from None
