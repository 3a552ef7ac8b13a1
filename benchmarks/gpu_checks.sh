#!/usr/bin/env bash
# The checks that need a GPU, in one run: the GPU tests, the op-level check of the cost model
# (benchmarks/op_level.py) and the fused kernels' speed (benchmarks/fused_kernels.py). Each output
# goes to $OUT (or /tmp/gpu_checks).
#
# Where the GPU machine's Python lacks autopar's solver packages (pulp, highspy: the H200
# image has torch, triton, transformers, networkx and sympy), carry them as wheels. Once, in
# the repository root of the machine that sends the run:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl pulp==3.3.2 highspy==1.16.0
# and run `bash benchmarks/gpu_checks.sh` there with `.whl` carried along.
set -o pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/device.txt"
status=0
python3 -m pytest -q tests/gpu 2>&1 | tee "$out/tests_gpu.txt" || status=1
python3 benchmarks/op_level.py 2>&1 | tee "$out/op_level.txt" || status=1
python3 benchmarks/fused_kernels.py 2>&1 | tee "$out/fused_kernels.txt" || status=1
exit $status
