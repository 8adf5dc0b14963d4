"""Publishing an output folder: on disk before its name appears, and known to have arrived.

``sync_tree`` flushes a finished folder before the rename that publishes it: the rename is
atomic, but without the flush a crash or power loss right after it can leave the new name
pointing at files whose data never reached the disk (zero-length shards under a complete name).

Which outputs this process has published, as found on disk, is what a Ctrl-C message reports.
A published folder keeps its inode through the final rename, so comparing OUT's identity with
the staging folder's tells whether OUT arrived even when Ctrl-C lands between the rename and any
bookkeeping after it (a flag set after ``os.replace`` could miss it).
"""

from __future__ import annotations

import os
from pathlib import Path

_PUBLISHING: list[tuple[Path, tuple[int, int]]] = []


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folders themselves to disk (call before the
    rename that publishes it, and ``sync_dir`` on its parent after)."""
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _fsync(path)
        sync_dir(Path(root))


def sync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk. Windows cannot open a folder to
    flush it, and its renames are journaled by NTFS: nothing to do there."""
    if os.name != "nt":
        _fsync(str(folder))


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
