"""Outputs reach the disk before their name appears: every file of a finished folder, and the
folder itself, is flushed (fsync) before the rename that publishes it, and the parent folder's
entry after it. Without that, a crash right after a conversion can leave OUT complete by name
with shards whose data never reached the disk.

The real ``os.fsync`` and ``os.replace`` run; the test only records, per call, which path the
descriptor or rename names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_hub.convert import convert
from moe_hub.run_checkpoints import finish_save, saving_dir


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    seen: list[tuple[str, str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        real_replace(src, dst, **kwargs)
        seen.append(("rename", os.path.abspath(src), os.path.abspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def assert_flushed_before_published(events: list, out: Path) -> None:
    out = out.resolve()
    renames = [i for i, (kind, _, dst) in enumerate(events) if kind == "rename" and dst == str(out)]
    assert renames, f"no rename to {out}: {events}"
    at = renames[-1]
    staging = Path(events[at][1])
    flushed = {path for kind, path, _ in events[:at] if kind == "fsync"}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert str(staging / path.relative_to(out)) in flushed, f"{path.name} not flushed"
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    for folder in folders:
        assert str(staging / folder.relative_to(out)).rstrip("/.") in {
            f.rstrip("/.") for f in flushed}, f"folder {folder} not flushed"
    after = {path for kind, path, _ in events[at + 1:] if kind == "fsync"}
    assert str(out.parent) in after, "the parent's new entry was not flushed"


def test_convert_flushes_out_before_the_rename(tmp_path: Path, tiny_dense: Path,
                                               events: list) -> None:
    out = convert(tiny_dense, tmp_path / "moe", experts=2, rank=2, progress=False)
    assert_flushed_before_published(events, out)


def test_convert_over_an_old_out_flushes_before_the_swap(tmp_path: Path, tiny_dense: Path,
                                                         events: list) -> None:
    convert(tiny_dense, tmp_path / "moe", experts=2, rank=2, progress=False)
    events.clear()
    out = convert(tiny_dense, tmp_path / "moe", experts=2, rank=3, progress=False,
                  overwrite=True)
    assert_flushed_before_published(events, out)


def test_trainer_checkpoint_is_flushed_before_it_is_named(tmp_path: Path, events: list) -> None:
    run = tmp_path / "run"
    saving = saving_dir(run, 4) / "checkpoint-4"
    (saving / "sub").mkdir(parents=True)
    for name in ("trainer_state.json", "optimizer.pt", "sub/rng_state.pth"):
        (saving / name).write_bytes(os.urandom(64))
    final = finish_save(run, 4)
    assert final == run / "checkpoint-4"
    assert_flushed_before_published(events, final)
