"""Interrupted fine-tuning: trainer checkpoints are saved whole or not at all, resume picks the
newest complete one (and refuses one missing a state file), one run per checkpoint folder, and
every Ctrl-C message says what is on disk.

Interrupts are injected at exact points: in-process by raising KeyboardInterrupt from inside the
Trainer's own save, in subprocesses by a real SIGINT sent by the process to itself right after a
chosen function returns (the hook only times the signal; everything else is the real CLI).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import assert_one_error_line
from helpers_finetune import tiny_checkpoint
from transformers import Trainer

from moe_hub.errors import MoEHubError
from moe_hub.finetune import finetune

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
FAST = dict(max_length=16, batch_size=4, lr=5e-2, warmup=0, scheduler="constant",
            logging_steps=1, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("resume"))


def write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def interrupt_save_at(monkeypatch, step: int) -> None:
    """Ctrl-C inside the Trainer's checkpoint save of ``step``, after the adapters, optimizer and
    scheduler are written and before the RNG and trainer state (as a slow disk would see it)."""
    original = Trainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step:
            raise KeyboardInterrupt("Ctrl-C during the save")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)


def test_an_interrupted_save_leaves_no_checkpoint_and_resume_continues(tmp_path, ckpt,
                                                                        monkeypatch):
    data = write_data(tmp_path / "d.jsonl")
    run_dir = tmp_path / "out.checkpoints"
    with monkeypatch.context() as patch:
        interrupt_save_at(patch, 6)
        with pytest.raises(KeyboardInterrupt) as caught:
            finetune(ckpt, data, tmp_path / "out", max_steps=9, save_steps=3, **FAST)
    # Only the finished save is there, nothing half-written under any name.
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-3"]
    assert "checkpoint-3" in str(caught.value) and "resume" in str(caught.value)
    metrics = finetune(ckpt, data, tmp_path / "out", max_steps=9, save_steps=3, resume=True,
                       **FAST)
    assert metrics["global_step"] == 9 and (tmp_path / "out" / "config.json").is_file()


def half_saved_copy(run_dir: Path, src: str, dst: str, keep: tuple[str, ...]) -> Path:
    """What transformers' own (non-atomic) save leaves when interrupted: the files it writes
    first, without trainer_state.json (written last)."""
    target = run_dir / dst
    target.mkdir()
    for name in keep:
        shutil.copy2(run_dir / src / name, target / name)
    return target


def test_resume_skips_half_written_checkpoints_of_older_runs(tmp_path, ckpt, capfd):
    data = write_data(tmp_path / "d.jsonl")
    run_dir = tmp_path / "out.checkpoints"
    finetune(ckpt, data, tmp_path / "out", max_steps=3, save_steps=3, keep_checkpoints=True,
             **FAST)
    shutil.rmtree(tmp_path / "out")
    half_saved_copy(run_dir, "checkpoint-3", "checkpoint-6",
                    ("moe_adapters.safetensors", "training_args.bin", "optimizer.pt"))
    capfd.readouterr()
    metrics = finetune(ckpt, data, tmp_path / "out", max_steps=6, save_steps=3, resume=True,
                       **FAST)
    assert metrics["global_step"] == 6
    err = capfd.readouterr().err
    assert "skipped checkpoint-6" in err and "resuming from checkpoint-3" in err


@pytest.mark.parametrize("damage, named", [
    ("delete scheduler.pt", "scheduler.pt is missing"),
    ("delete optimizer.pt", "optimizer.pt is missing"),
    ("truncate optimizer.pt", "optimizer.pt is truncated"),
    ("truncate moe_adapters.safetensors", "moe_adapters.safetensors is truncated"),
])
def test_resume_refuses_a_checkpoint_missing_or_truncating_a_state_file(tmp_path, ckpt, damage,
                                                                       named):
    data = write_data(tmp_path / "d.jsonl")
    finetune(ckpt, data, tmp_path / "out", max_steps=3, save_steps=3, keep_checkpoints=True,
             **FAST)
    shutil.rmtree(tmp_path / "out")
    saved = tmp_path / "out.checkpoints" / "checkpoint-3"
    action, name = damage.split()
    if action == "delete":
        (saved / name).unlink()
    else:
        content = (saved / name).read_bytes()
        (saved / name).write_bytes(content[: len(content) // 2])
    for resume in (True, str(saved)):
        with pytest.raises(MoEHubError, match=f"cannot resume from .*checkpoint-3: {named}"):
            finetune(ckpt, data, tmp_path / "out", max_steps=6, save_steps=3, resume=resume,
                     **FAST)
    assert not (tmp_path / "out").exists()


def hold_lock(run_dir: Path, output: Path) -> subprocess.Popen:
    """Another process that holds the run's lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from moe_hub.run_checkpoints import run_lock
        with run_lock(Path({str(run_dir)!r}), Path({str(output)!r})):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_finetune_into_the_same_output_is_refused_at_once(tmp_path, ckpt):
    out = tmp_path / "out"
    holder = hold_lock(tmp_path / "out.checkpoints", out)
    try:
        # The data does not exist: the lock is checked before it is read (and before training).
        with pytest.raises(MoEHubError, match=rf"another moe-hub finetune \(pid {holder.pid}\) "
                                              r"is writing .*out.checkpoints"):
            finetune(ckpt, tmp_path / "missing.jsonl", out, max_steps=3, **FAST)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists()
    # The holder is gone: its lock (even a stale lock file naming it) is taken over.
    (tmp_path / ".out.checkpoints.lock").write_text(f"{holder.pid}\n")
    metrics = finetune(ckpt, write_data(tmp_path / "d.jsonl"), out, max_steps=2, **FAST)
    assert metrics["global_step"] == 2 and not (tmp_path / ".out.checkpoints.lock").exists()


def run_cli(args: list[str], hook: str, cwd: Path) -> subprocess.CompletedProcess:
    """``moe-hub ARGS`` in a fresh interpreter, with ``hook`` (Python) run before it: the hook
    only arranges when a real SIGINT arrives."""
    code = "import os, signal, sys\n" + textwrap.dedent(hook) + textwrap.dedent("""
        from moe_hub.cli.app import main
        sys.argv = ["moe-hub", *sys.argv[1:]]
        main()
    """)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


SIGINT_AFTER_SAVE = """
    import importlib
    ft = importlib.import_module("moe_hub.finetune")
    make = ft._make_trainer_class
    def make_interrupting():
        cls = make()
        class Interrupting(cls):
            def _save_checkpoint(self, model, trial):
                super()._save_checkpoint(model, trial)
                if self.state.global_step == 4:
                    os.kill(os.getpid(), signal.SIGINT)
        return Interrupting
    ft._make_trainer_class = make_interrupting
"""


def test_ctrl_c_in_training_names_the_checkpoints_and_the_resume_command(tmp_path, ckpt):
    data = write_data(tmp_path / "d.jsonl")
    args = ["finetune", str(ckpt), "--data", str(data), "--output", str(tmp_path / "out"),
            "--max-steps", "6", "--save-steps", "2", "--max-length", "16", "--lr", "0.05",
            "--no-progress"]
    done = run_cli(args, SIGINT_AFTER_SAVE, tmp_path)
    assert done.returncode == 130, done.stderr
    assert_one_error_line(done.returncode, done.stderr, "out was not written",
                          "checkpoint-4, checkpoint-2", "resume from checkpoint-4")
    assert "nothing was written" not in done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("error:"))
    command = shlex.split(line.rpartition("with: ")[2])
    assert command[0] == "moe-hub" and command[-1] == "--resume"
    assert sorted(p.name for p in (tmp_path / "out.checkpoints").iterdir()) == \
        ["checkpoint-2", "checkpoint-4"]
    # The printed command resumes and finishes the run (in this process: no signal needed).
    from typer.testing import CliRunner

    from moe_hub.cli.app import app

    resumed = CliRunner().invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["global_step"] == 6
    assert (tmp_path / "out" / "moe_adapters.safetensors").is_file()


SIGINT_AFTER_PUBLISH = """
    import importlib
    target = importlib.import_module("moe_hub.{module}")
    publish = target.publish
    def publish_then_interrupt(*args, **kwargs):
        publish(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
    target.publish = publish_then_interrupt
"""


@pytest.mark.parametrize("command", ["finetune", "convert"])
def test_ctrl_c_right_after_the_final_rename_says_the_output_is_complete(tmp_path, ckpt,
                                                                        command):
    out = tmp_path / "out"
    if command == "finetune":
        args = ["finetune", str(ckpt), "--data", str(write_data(tmp_path / "d.jsonl")),
                "--output", str(out), "--max-steps", "2", "--max-length", "16", "--no-progress"]
    else:
        args = ["convert", str(ckpt.parent / "dense-0"), str(out), "--experts", "2", "--rank",
                "2", "--no-progress"]
    done = run_cli(args, SIGINT_AFTER_PUBLISH.format(module=command), tmp_path)
    assert_one_error_line(done.returncode, done.stderr, f"interrupted after {out} was written "
                                                        f"completely")
    assert done.returncode == 130 and "nothing was written" not in done.stderr
    assert (out / "config.json").is_file() and (out / "moe_adapters.safetensors").is_file()


SIGKILL_IN_SAVE = """
    from transformers import Trainer
    original = Trainer._save_rng_state
    def save_rng_state(self, output_dir):
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-save: adapters, optimizer written
        return original(self, output_dir)
    Trainer._save_rng_state = save_rng_state
"""


def finetune_saving_every_2_steps(tmp_path, ckpt, patch: str):
    """``moe-hub finetune`` for 6 steps with a checkpoint every 2, ``patch`` run first in its
    process; returns the data file and the finished process."""
    data = write_data(tmp_path / "d.jsonl")
    args = ["finetune", str(ckpt), "--data", str(data), "--output", str(tmp_path / "out"),
            "--max-steps", "6", "--save-steps", "2", "--max-length", "16", "--no-progress"]
    return data, run_cli(args, patch, tmp_path)


def test_a_run_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, ckpt, capfd):
    data, done = finetune_saving_every_2_steps(tmp_path, ckpt, SIGKILL_IN_SAVE)
    assert done.returncode == -signal.SIGKILL, done.stderr
    run_dir = tmp_path / "out.checkpoints"
    # What the kill left: checkpoint-2, the half-saved step 4 under its hidden name, the lock.
    assert sorted(p.name for p in run_dir.iterdir()) == [".checkpoint-4.saving", "checkpoint-2"]
    assert (tmp_path / ".out.checkpoints.lock").is_file()
    capfd.readouterr()
    metrics = finetune(ckpt, data, tmp_path / "out", max_steps=6, save_steps=2, resume=True,
                       **FAST)
    assert metrics["global_step"] == 6 and not run_dir.exists()
    err = capfd.readouterr().err
    assert "removed 1 half-saved checkpoint folder(s) left by interrupted runs" in err
    assert ".checkpoint-4.saving" in err


DISK_FULL_AT_SAVE = """
    import resource
    from transformers import Trainer
    original = Trainer._save_checkpoint
    def save_checkpoint(self, model, trial):
        if self.state.global_step == 4:
            # From here on no file may grow past 1 KiB: the disk is "full" during this save.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
        return original(self, model, trial)
    Trainer._save_checkpoint = save_checkpoint
"""


def test_a_full_disk_during_a_save_leaves_no_checkpoint_and_names_the_resume(tmp_path, ckpt):
    data, done = finetune_saving_every_2_steps(tmp_path, ckpt, DISK_FULL_AT_SAVE)
    assert_one_error_line(done.returncode, done.stderr, "cannot save checkpoint-4 in",
                          "out was not written; free disk space, then resume from checkpoint-2 "
                          "with --resume")
    assert sorted(p.name for p in (tmp_path / "out.checkpoints").iterdir()) == ["checkpoint-2"]
    metrics = finetune(ckpt, data, tmp_path / "out", max_steps=6, save_steps=2, resume=True,
                       **FAST)
    assert metrics["global_step"] == 6


LIBRARY_FAILS_AT_SAVE = """
    from transformers import Trainer
    original = Trainer._save_optimizer_and_scheduler
    def save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == 4:  # what an incompatible library does mid-save
            raise AttributeError("'DTensor' object has no attribute 'quant_state'")
        return original(self, output_dir)
    Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
"""


def test_a_save_failing_for_another_reason_does_not_blame_the_disk(tmp_path, ckpt):
    """Only a failing write is fixed by freeing space: another error is named as it is."""
    _, done = finetune_saving_every_2_steps(tmp_path, ckpt, LIBRARY_FAILS_AT_SAVE)
    assert_one_error_line(done.returncode, done.stderr, "cannot save checkpoint-4 in",
                          "has no attribute 'quant_state'", "out was not written; fix that, "
                          "then resume from checkpoint-2 with --resume")
    assert "disk" not in done.stderr
