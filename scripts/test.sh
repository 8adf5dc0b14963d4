#!/usr/bin/env bash
# Install moe-hub with its test extras into ./.venv and run the test suite (what CI runs).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv || exit 1
. .venv/bin/activate
# torch first and pinned: on the project machines 2.13.0 is a CPU wheel on local disk, while an
# unpinned torch (asked for by any package) would pull a multi-GB CUDA build.
python -m pip install --quiet torch==2.13.0 || exit 1
python -m pip install --quiet -e ".[test]" || exit 1
python -m pytest "$@"
status=$?
# pytest exits 5 when it ran no test: that must fail, never pass silently.
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
