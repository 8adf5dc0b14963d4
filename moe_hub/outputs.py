"""Which outputs this process has published, as found on disk: what a Ctrl-C message reports.

A published folder keeps its inode through the final rename, so comparing OUT's identity with
the staging folder's tells whether OUT arrived even when Ctrl-C lands between the rename and any
bookkeeping after it (a flag set after ``os.replace`` could miss it).
"""

from __future__ import annotations

import os
from pathlib import Path

_PUBLISHING: list[tuple[Path, tuple[int, int]]] = []


def record_publish(staging: Path, out: Path) -> None:
    """Call right before ``staging`` is renamed to ``out``."""
    info = os.stat(staging)
    _PUBLISHING.append((Path(out), (info.st_dev, info.st_ino)))


def publish_mark() -> int:
    """A mark for ``published_outputs(since=...)``: publishes begun after it only."""
    return len(_PUBLISHING)


def published_outputs(since: int = 0) -> list[Path]:
    """The outputs published completely (their folder is in place), of the publishes begun
    after the mark ``since``."""
    done: list[Path] = []
    for out, identity in _PUBLISHING[since:]:
        try:
            info = out.stat()
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == identity and out not in done:
            done.append(out)
    return done
