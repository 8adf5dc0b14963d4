#!/usr/bin/env bash
# Issue 5's GPU half in as few device calls as possible: the kernel tests on the GPU, then the
# benchmark tables of PERFORMANCE.md (targets 1-4), each log written under $OUT.
#
# Here (network, once per change of the code):
#     echo /.whl/ >> .git/info/exclude
#     bash scripts/gpu_session.sh prepare      # .whl/: moe_hub (built from this tree),
#                                              # and bitsandbytes, about 45 MB
# On the device machine (carry .whl; each step fits one 600 s call):
#     bash scripts/gpu_session.sh kernels      # pytest tests/test_kernels.py on CUDA + kernel GB/s
#     bash scripts/gpu_session.sh train        # step time vs PEFT LoRA, bf16 and NF4 bases
#     bash scripts/gpu_session.sh generate     # generate() vs the dense model, batch 1 and 16
#     bash scripts/gpu_session.sh vllm         # issue 24: vLLM's greedy tokens equal
#                                              # transformers' (RMoE and top-k checkpoints on the
#                                              # Transformers backend, their Mixtral export on
#                                              # vLLM's own); skipped where vllm is not installed
# The device image has torch, transformers, peft, triton, pytest; not bitsandbytes, datasets
# or this package (installed from its wheel built here).
set -uo pipefail

step=${1:?usage: gpu_session.sh prepare|kernels|train|generate|vllm|all}
out=${OUT:-gpu-results}
cd "$(dirname "$0")/.."

if [[ $step == prepare ]]; then
    set -e
    rm -rf .whl && mkdir .whl
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl .
    rm -rf build  # setuptools' scratch tree: a stale copy of the package beside the real one
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2
    du -sh .whl
    exit 0
fi

mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "no wheels: run 'prepare' here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, transformers, peft, triton, bitsandbytes as b; print('torch',
torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
'| peft', peft.__version__, '| triton', triton.__version__, '| bitsandbytes', b.__version__)"
} | tee "$out/environment.txt"

status=0
run() {  # run NAME COMMAND...: log to $OUT/NAME.log, keep going, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 0 ]] || { echo "== $name failed (exit $rc)"; status=1; }
}

if [[ $step == kernels || $step == all ]]; then
    run test_kernels python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
    run bench_expert_kernel_bf16 python3 benchmarks/bench_expert_kernel.py --dtype bf16
fi
if [[ $step == train || $step == all ]]; then
    run bench_train_step python3 benchmarks/bench_train_step.py --bases bf16,nf4
fi
if [[ $step == generate || $step == all ]]; then
    run bench_generate_smollm2 python3 benchmarks/bench_generate.py --random smollm2-135m \
        --device cuda --dtype bfloat16
    run bench_generate_tinyllama python3 benchmarks/bench_generate.py --random tinyllama-1.1b \
        --device cuda --dtype bfloat16
fi
if [[ $step == vllm || $step == all ]]; then
    # Never installed here (the device machine has no network): run only where the image has it.
    if python3 -c "import vllm" 2>/dev/null; then
        run vllm_check python3 scripts/vllm_check.py --random --out "$out"
    else
        echo "== vllm_check: vllm is not installed on this machine; skipped" \
            | tee "$out/vllm_check.log"
    fi
fi
exit $status
