#!/usr/bin/env bash
# The prepared GPU check: the CUDA equality tests, then eval/bench_scale.py at 7B on the GPU with T = 10 on
# the 7B recipe's calibration size (32 rows x 3 tasks x 512 tokens). Two steps, from the repository root:
#
#   here, on the CPU machine (PyPI reachable):  bash eval/device_check.sh --prepare
#       downloads the wheels the GPU image lacks (mergekit and its pydantic stack, for Python 3.12) into
#       .whl/ and copies the calibration prompts into .device_data/ (both git-ignored, both carried);
#   on the lent machine, the device tool's run with carry [".whl", ".device_data"] and
#       command "bash eval/device_check.sh", timeout_s 600: logs and the bench report come back in $OUT.
#
# ITERATIONS, ROWS, TOKENS, CHECKPOINT_GIB and BENCH_TIMEOUT override the defaults (a shorter first run:
# ITERATIONS=2).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    for d in .whl .device_data; do
        grep -qxF "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
    done
    rm -rf .whl && mkdir -p .whl .device_data
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 immutables==0.21 || exit 1
    rm -rf .device_data/calibration && cp -r "${FWLLM_DATA:-fwllm/_data/datasets}/calibration" .device_data/ || exit 1
    du -sh .whl .device_data
    exit 0
fi

OUT="${OUT:-$(mktemp -d)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "Error: run 'bash eval/device_check.sh --prepare' here first and carry .whl"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" FWLLM_DATA="$PWD/.device_data" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, mergekit; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# 1. CUDA variants of the equality tests (they skip on a machine without a GPU)
python3 -m pytest -q -p no:cacheprovider -rs tests/solvers/test_layerwise_gradient.py -k cuda 2>&1 \
    | tee "$OUT/cuda_tests.log"

# 2. the 7B LoRA pool on the GPU; host RAM there is 128 GiB, so the checkpoints of all rows fit in one group
# (stopped after BENCH_TIMEOUT s, so that the logs still come back inside the tool's 600-s limit)
timeout "${BENCH_TIMEOUT:-480}" python3 eval/bench_scale.py --models llama2-7b --device cuda --iterations "${ITERATIONS:-10}" \
    --rows "${ROWS:-96}" --tokens "${TOKENS:-512}" --checkpoint-memory "${CHECKPOINT_GIB:-40}" --full-pool 0 \
    --work /tmp/bench_scale --out "$OUT" 2>&1 | grep -v -e "Loading" -e "Writing" -e "Executing" \
    | tee "$OUT/bench_scale.log"
