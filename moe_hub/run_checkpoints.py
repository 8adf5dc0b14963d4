"""The Trainer checkpoints of a fine-tuning run (``<OUT>.checkpoints/checkpoint-N``): saved whole
or not at all, checked before a resume, and owned by one run at a time.

transformers' Trainer writes ``checkpoint-N`` file by file (adapters, optimizer, scheduler, RNG,
``trainer_state.json`` last), so a Ctrl-C, a kill or a full disk in the middle leaves a folder that
``get_last_checkpoint`` still picks. Here a checkpoint is written under a hidden name and renamed
when complete; folders left half-written by older runs are skipped on resume (they lack
``trainer_state.json``, the Trainer's last file) and a checkpoint that has its state but lacks or
truncates another file is refused by name, never resumed with a restarted LR schedule.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import MoEHubError
from .outputs import sync_dir, sync_tree

PREFIX = "checkpoint"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
_NAME = re.compile(rf"^{PREFIX}-(\d+)$")
_SAVING = re.compile(rf"^\.{PREFIX}-(\d+)\.saving$")


def saving_dir(run_dir: Path, step: int) -> Path:
    """Where ``checkpoint-<step>`` is written before it is renamed into ``run_dir``: a hidden
    sibling (same filesystem, so the rename is atomic) that ``get_last_checkpoint`` ignores. The
    name is the same in every process of a distributed run, which all write into it."""
    return run_dir / f".{PREFIX}-{step}.saving"


def finish_save(run_dir: Path, step: int) -> Path:
    """Move the completed ``checkpoint-<step>`` from its saving folder into ``run_dir``; a folder
    of that name already there (half-written by an older run) is replaced."""
    staging = saving_dir(run_dir, step)
    final = run_dir / f"{PREFIX}-{step}"
    if final.exists():
        old = run_dir / f".{PREFIX}-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    sync_tree(staging / final.name)
    os.replace(staging / final.name, final)
    sync_dir(run_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``run_dir``, newest (highest N) first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def _safetensors_problem(path: Path) -> str | None:
    from .safetensors_io import read_header

    try:
        header, data_start = read_header(path)
    except MoEHubError:
        return f"{path.name} is truncated or corrupt"
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"),
              default=0)
    if path.stat().st_size < data_start + end:
        return f"{path.name} is truncated"
    return None


def problem(checkpoint: Path) -> str | None:
    """What keeps ``checkpoint`` from being resumed (the file and what is wrong with it), None
    when it is complete: the Trainer state, the adapters, the optimizer and scheduler states and
    the RNG state, each whole (``torch.save`` writes a zip archive, whose directory is at its end,
    so a truncated one is not a zip file)."""
    from .modeling.modeling_moe_lora import ADAPTER_WEIGHTS

    state = checkpoint / TRAINER_STATE
    if not state.is_file():
        return f"it has no {TRAINER_STATE} (its save was interrupted)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is truncated or corrupt"
    adapters = checkpoint / ADAPTER_WEIGHTS
    if not adapters.is_file():
        return f"{ADAPTER_WEIGHTS} is missing"
    broken = _safetensors_problem(adapters)
    if broken:
        return broken
    for name in (OPTIMIZER, SCHEDULER):
        path = checkpoint / name
        if name == OPTIMIZER and not path.exists() and _sharded_optimizer(checkpoint):
            continue
        if not path.is_file():
            what = "the learning-rate schedule" if name == SCHEDULER else "the optimizer state"
            return f"{name} is missing (resuming without it would restart {what})"
        if not zipfile.is_zipfile(path):
            return f"{name} is truncated or corrupt"
    rng = sorted(checkpoint.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    for path in rng:
        if not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or corrupt"
    return None


def _sharded_optimizer(checkpoint: Path) -> bool:
    """Optimizer states saved in another form than one ``optimizer.pt``, as Trainer accepts them
    too: FSDP's ``optimizer_0/`` folders, ``optimizer.bin``, DeepSpeed's ``global_step*``, XLA's
    per-rank files."""
    for path in checkpoint.iterdir():
        folder = path.is_dir()
        if (folder and ("optimizer" in path.name or path.name.startswith("global_step"))) \
                or path.name == "optimizer.bin" \
                or re.fullmatch(r"rank\d+-of-\d+-optimizer\.pt", path.name):
            return True
    return False


def _interrupted_save(reason: str) -> bool:
    return reason.endswith("(its save was interrupted)")


def choose_resume(run_dir: Path, explicit: str | None) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from and the half-written ones skipped on the way.

    ``explicit`` (``--resume-from``) must be complete. Otherwise the newest complete checkpoint
    of ``run_dir`` is taken: newer ones whose save was interrupted (no ``trainer_state.json``) are
    skipped; one that has its state but lacks or truncates another file is refused by name, as
    resuming before it would silently drop steps the user believes are saved."""
    if explicit is not None:
        path = Path(explicit)
        from .modeling.modeling_moe_lora import ADAPTER_WEIGHTS

        if not path.is_dir() or (step_of(path) is None and not (path / ADAPTER_WEIGHTS).exists()):
            raise MoEHubError(f"cannot resume from {path}: it is not a checkpoint-N directory "
                              f"written by moe-hub finetune")
        reason = problem(path)
        if reason:
            raise MoEHubError(f"cannot resume from {path}: {reason}; pass --resume-from another "
                              f"checkpoint-N of {path.parent} or --resume for the newest "
                              f"complete one")
        return path, []
    skipped: list[Path] = []
    for candidate in checkpoints(run_dir):
        reason = problem(candidate)
        if reason is None:
            return candidate, skipped
        if not _interrupted_save(reason):
            raise MoEHubError(f"cannot resume from {candidate}: {reason}; restore the file or "
                              f"pass --resume-from an earlier checkpoint-N of {run_dir}")
        skipped.append(candidate)
    return None, skipped


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints of ``run_dir`` a resume can start from, newest first."""
    return [path for path in checkpoints(run_dir) if problem(path) is None]


def remove_saving_leftovers(run_dir: Path) -> list[Path]:
    """Remove the saving folders a killed run left in ``run_dir`` (call with the run's lock
    held: no other process is saving there then)."""
    removed = []
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if _SAVING.match(path.name) or re.match(rf"^\.{PREFIX}-\d+\.old$", path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    except OSError as err:
        return err.errno != errno.ESRCH
    return True


@contextmanager
def run_lock(run_dir: Path, output: Path) -> Iterator[None]:
    """Hold ``<run_dir>.lock`` (next to the run folder, created if needed) for the run: a second
    fine-tune into the same checkpoint folder is refused at once, naming the first one's pid.

    The lock is an ``fcntl.flock`` on the file, which the kernel releases when its holder dies, so
    a lock file left by a killed run (its pid no longer running) is simply taken over."""
    lock_path = run_dir.with_name(f".{run_dir.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: an O_EXCL file holding the pid
        yield from _exclusive_file_lock(lock_path, output)
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _busy(run_dir, output, holder) from None
        # The holder before us may have unlinked the file between our open and flock: only a
        # lock on the file that is still at lock_path counts.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


def _exclusive_file_lock(lock_path: Path, output: Path) -> Iterator[None]:
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            holder = lock_path.read_text(errors="replace").strip()
            if holder.isdigit() and pid_alive(int(holder)):
                raise _busy(lock_path.with_name(lock_path.name[1:-5]), output, holder) from None
            lock_path.unlink(missing_ok=True)  # a dead run's lock: taken over
    else:
        raise MoEHubError(f"cannot take the lock {lock_path}: delete it if no fine-tune runs")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        lock_path.unlink(missing_ok=True)


def _busy(run_dir: Path, output: Path, holder: str) -> MoEHubError:
    return MoEHubError(f"another moe-hub finetune (pid {holder}) is writing {run_dir}: wait for "
                       f"it to finish, or pass another --output (or checkpoint_dir) than {output}")


__all__ = ["checkpoints", "choose_resume", "complete_checkpoints", "finish_save", "problem",
           "remove_saving_leftovers", "run_lock", "saving_dir"]
