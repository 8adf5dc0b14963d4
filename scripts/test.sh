#!/usr/bin/env bash
# Install moe-hub with its test extras into a virtual environment and run the test suite from the
# repository root with `python -m pytest` (what CI runs, through .ci/run).
#
#   bash scripts/test.sh [PYTEST ARGS]            pinned set (constraints/test.txt) in .venv
#   bash scripts/test.sh --newest [PYTEST ARGS]   newest release of every dependency, .venv-newest
#   bash scripts/test.sh --oldest [PYTEST ARGS]   lowest versions pyproject allows, .venv-oldest
#   bash scripts/test.sh --newest --update-pins   ... and, if the suite passes, write that set
#                                                 to constraints/test.txt
#
# The pinned set makes a fresh clone's CI independent of the day's releases; --newest and
# --oldest check on purpose what users' unpinned installs (pyproject's ranges) will get, and
# load checkpoints that the pinned set converted (tests/test_transformers_compat.py).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=pinned
update_pins=0
while [ $# -gt 0 ]; do
    case "$1" in
        --newest) mode=newest ;;
        --oldest) mode=oldest ;;
        --update-pins) update_pins=1 ;;
        *) break ;;
    esac
    shift
done
if [ "$update_pins" -eq 1 ] && [ "$mode" != newest ]; then
    echo "error: --update-pins goes with --newest (pins are refreshed from the newest releases)" >&2
    exit 2
fi

# torch first and pinned in every mode: on the project machines 2.13.0 is a CPU wheel on local
# disk, while an unpinned torch (asked for by any package) would pull a multi-GB CUDA build.
TORCH=torch==2.13.0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "$TORCH" >"$scratch/torch.txt"

# install VENV PIP-ARGS...: a virtual environment with torch and moe-hub[test] installed.
install() {
    local venv=$1
    shift
    python3 -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install --quiet "$TORCH" || return 1
    "$venv/bin/python" -m pip install --quiet -c "$scratch/torch.txt" "$@" -e ".[test]"
}

case "$mode" in
    pinned)
        install .venv -c constraints/test.txt || exit 1
        ;;
    newest)
        install .venv-newest --upgrade --upgrade-strategy eager || exit 1
        ;;
    oldest)
        python3 scripts/pins.py lowest >"$scratch/lowest.txt" || exit 1
        echo "lowest allowed versions:" $(cat "$scratch/lowest.txt")
        install .venv-oldest -c "$scratch/lowest.txt" || exit 1
        ;;
esac
if [ "$mode" != pinned ]; then
    # Checkpoints as the pinned set writes them, for this set to load.
    install .venv -c constraints/test.txt || exit 1
    .venv/bin/python scripts/make_compat_checkpoints.py "$scratch/compat" >/dev/null 2>&1 || {
        echo "error: the pinned environment could not write the compatibility checkpoints" >&2
        exit 1
    }
    export MOE_HUB_COMPAT_CHECKPOINTS="$scratch/compat"
fi

venv=.venv
[ "$mode" != pinned ] && venv=.venv-$mode
. "$venv/bin/activate"
echo "testing with:" $(python -m pip freeze --exclude-editable | grep -iE \
    '^(torch|transformers|peft|accelerate|trl|huggingface.hub|bitsandbytes|datasets|kernels)==')

python -m pytest "$@"
status=$?
# pytest exits 5 when it ran no test: that must fail, never pass silently.
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
if [ "$status" -eq 0 ] && [ "$update_pins" -eq 1 ]; then
    python scripts/pins.py freeze >constraints/test.txt || exit 1
    echo "constraints/test.txt now pins the set that just passed; commit it"
fi
exit "$status"
