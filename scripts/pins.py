"""Version sets for scripts/test.sh.

    python scripts/pins.py lowest   the lowest versions pyproject allows for the ecosystem
                                    libraries whose API moe-hub follows, as pip constraints
    python scripts/pins.py freeze   the running environment as pip constraints (what
                                    constraints/test.txt holds), without moe-hub itself
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The libraries whose behaviour the code depends on release by release; tools (pytest, ruff) and
# torch (pinned to the machine's CPU wheel) are left to the resolver.
FOLLOWED = ("transformers", "peft", "accelerate", "trl", "huggingface_hub", "bitsandbytes",
            "datasets")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lowest() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    found = {}
    for requirement in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement)
        if match and _canonical(match[1]) in {_canonical(n) for n in FOLLOWED}:
            found[_canonical(match[1])] = f"{match[1]}=={match[2]}"
    missing = {_canonical(n) for n in FOLLOWED} - found.keys()
    if missing:
        raise SystemExit(f"pyproject.toml gives no lower bound (>=) for {sorted(missing)}")
    return [found[_canonical(n)] for n in FOLLOWED]


def freeze() -> list[str]:
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    # A local version label (2.13.0+cpu) names a build, not a release pip can look up by it.
    pins = sorted((re.sub(r"\+[\w.]+$", "", line) for line in listed if "==" in line),
                  key=str.lower)
    header = ["# The set the test suite last passed with (scripts/test.sh installs it).",
              "# Refresh: bash scripts/test.sh --newest --update-pins"]
    return header + pins


if __name__ == "__main__":
    commands = {"lowest": lowest, "freeze": freeze}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python {Path(__file__).name} {{{'|'.join(commands)}}}")
    print("\n".join(commands[sys.argv[1]]()))
