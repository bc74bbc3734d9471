#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run, most important first: every test that skips without a GPU, then
# weight matching on the GPU (B4 with --device cuda: width 8192 for both MLP pairs, the VGG pair at 4096), then
# the kernels' checks and timings (B5). For a machine whose python3 already holds CUDA torch, triton, numba,
# scipy, scikit-learn and safetensors (nothing is downloaded): this checkout is installed there without
# dependencies. Each step's output goes to a file under $OUT (default gpu_check_output/) and to the screen; a
# step that fails or runs out of its time does not stop the next. Test modules that import a package the machine
# lacks (the H200 image has no plotly or loss-landscapes) fail to collect without stopping the others.
#
#     bash benchmarks/gpu_check.sh [tests] [b4] [b5]    # the parts named (default: all three)
#
# Not yet run on a GPU: its parts' times are estimates (tests 1-3 min with Triton's compiles, b4 3-5 min, most
# of it the 8192-unit LAPs on the CPU, b5 2-4 min); each part's limit below bounds it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_output}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output also in $out/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

parts=${*:-tests b4 b5}
step install 120 python3 -m pip install -q --no-deps --no-build-isolation -e .
step warm_up 120 python3 -c "from modeconn_fast.rebasin import lap; lap.warm_up()"
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$out/device.txt"
for part in $parts; do
    case $part in
        tests) step gpu_tests 240 python3 -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors tests -k "cuda or gpu" ;;
        b4) step b4_cuda_8192 360 python3 -m benchmarks.b4_rebasin --device cuda --widths 8192 --kinds mlp-init mlp --markdown
            step b4_cuda_vgg 120 python3 -m benchmarks.b4_rebasin --device cuda --widths 4096 --kinds vgg --markdown ;;
        b5) step b5 240 python3 -m benchmarks.gpu_kernels ;;
        *) echo "unknown part $part: use tests, b4 or b5" >&2; exit 2 ;;
    esac
done
