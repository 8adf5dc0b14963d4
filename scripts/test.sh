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
# --oldest check on purpose what users' unpinned installs (pyproject's ranges) will get.
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

case "$mode" in
    pinned) venv=.venv ;;
    *) venv=.venv-$mode ;;
esac
python3 -m venv "$venv" || exit 1
. "$venv/bin/activate"

# torch first and pinned in every mode: on the project machines 2.13.0 is a CPU wheel on local
# disk, while an unpinned torch (asked for by any package) would pull a multi-GB CUDA build.
TORCH=torch==2.13.0
torch_pin=$(mktemp)
trap 'rm -f "$torch_pin" "${bounds:-}"' EXIT
echo "$TORCH" >"$torch_pin"
python -m pip install --quiet "$TORCH" || exit 1

case "$mode" in
    pinned)
        python -m pip install --quiet -c constraints/test.txt -e ".[test]" || exit 1
        ;;
    newest)
        python -m pip install --quiet --upgrade --upgrade-strategy eager -c "$torch_pin" \
            -e ".[test]" || exit 1
        ;;
    oldest)
        bounds=$(mktemp)
        python scripts/pins.py lowest >"$bounds" || exit 1
        echo "lowest allowed versions:" $(cat "$bounds")
        python -m pip install --quiet -c "$bounds" -c "$torch_pin" -e ".[test]" || exit 1
        ;;
esac
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
