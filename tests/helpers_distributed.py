"""Starting a real multi-process gloo group from a test: ``torchrun`` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The sitecustomize every launched process finds first: FSDP through accelerate on the CPU, no
#: DeepSpeed shared-memory op build (see there).
LAUNCHED_SITE = REPO / "tests" / "launched"


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launched group: ``LAUNCHED_SITE`` and this checkout first on the
    path, one thread per process (the group's processes share the machine's cores), no GPU."""
    path = os.pathsep.join([str(LAUNCHED_SITE), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path,
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return env


def torchrun(*args: str, nproc: int = 2, timeout: float = 300,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC ARGS...`` on a free local port; output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env or launch_env(), capture_output=True,
                          text=True, timeout=timeout)


def accelerate_launch(config: Path, *args: str, nproc: int = 2, timeout: float = 300
                      ) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG --num_processes NPROC ARGS...`` on a free port
    (on this CPU-only machine with FSDP made available to accelerate, see ``LAUNCHED_SITE``)."""
    env = launch_env()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()),
               *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_cases_in_group(cases: dict[str, Callable[[], dict]], out: str) -> None:
    """Run each case on every process of the current group (one failing case is reported and
    the next still runs), then rank 0 writes the results as JSON to ``out`` and the group ends."""
    import json
    import traceback

    import torch.distributed as dist

    results = {}
    for key, case in cases.items():
        try:
            results[key] = case()
        except Exception:  # reported per case; the next case still runs
            results[key] = {"ok": False, "error": traceback.format_exc(limit=-6)}
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
