"""Nothing at the repository root shadows an installed distribution.

Python puts the current folder first on ``sys.path`` for ``python -m pytest``, ``python -c``, a
REPL and a notebook, so a root folder that is a regular package wins over any installed package of
the same name. The root ``kernels/`` once shadowed Hugging Face's ``kernels``, which transformers
5.25 imports while loading ``modeling_utils``: every import of transformers from a checkout broke.
Each check runs in a fresh interpreter started in the repository root, as a user's would be.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT_FOLDERS = sorted(
    p.name for p in REPO.iterdir()
    if p.is_dir() and p.name.isidentifier() and p.name != "moe_hub" and not p.name.startswith(".")
)


def run_in_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root (root first on sys.path), with
    ``extra_path`` after everything else on the path, where site-packages would be."""
    if extra_path is not None:
        code = f"import sys; sys.path.append({str(extra_path)!r})\n{code}"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_installed_kernels_distribution_wins_and_transformers_imports():
    """The very failure of transformers 5.25: `from kernels import CUDAProperties` inside
    modeling_utils must reach Hugging Face's `kernels`, and moe_hub must import from the root."""
    from importlib.metadata import distribution

    installed = Path(distribution("kernels").locate_file("kernels")).resolve()
    proc = run_in_root(
        "import kernels, transformers.modeling_utils\n"
        "from moe_hub import convert\n"
        "import moe_hub.kernels.moe_lora_triton as triton_kernel\n"
        "print(kernels.__file__); print(triton_kernel.__file__)"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    hub_kernels, ours = (Path(line).resolve() for line in proc.stdout.split())
    assert hub_kernels.parent == installed
    assert ours == REPO / "moe_hub" / "kernels" / "moe_lora_triton.py"


@pytest.mark.parametrize("name", ROOT_FOLDERS)
def test_root_folder_yields_to_an_installed_package(name, tmp_path):
    """A regular package of the same name placed last on sys.path (as site-packages is) is what
    `import NAME` gives from the root: the root folder is no package that could win."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("MARK = 'installed'\n")
    proc = run_in_root(f"import {name}; print({name}.MARK)", extra_path=site)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "installed"


def test_root_folders_were_found():
    # The parametrised test above must not pass by having nothing to check.
    assert {"tests", "scripts", "benchmarks"} <= set(ROOT_FOLDERS)


def test_outputs_of_the_readme_commands_are_git_ignored() -> None:
    """Running the README's scripts and examples from the repository root leaves no untracked
    files behind: their output folders are ignored (compare_routers alone writes GBs)."""
    outputs = ["runs/compare/compare_routers.json", "runs/task-adapters/results.json",
               "smol-moe/config.json", "smol-moe-ft/config.json", "smol-mix/config.json",
               "smol-mix-routed/config.json", "chat.jsonl"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(outputs)
