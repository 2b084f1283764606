#!/usr/bin/env bash
# The GPU checks and benchmarks in one run, on a machine with an NVIDIA GPU, onnxruntime-gpu (pip install -e
# ".[ort-gpu,test]") and a CUDA build of torch: the gpu-marked tests (ort-cuda parity and reduced precision, the
# deployment matrix's ort-cuda column: plain onnxruntime-gpu in a process without edgeattn), then bench_attention
# (every lowering on ort-cuda, torch eager on the GPU), bench_models (the zoo on ort-cuda) and compiled
# FlexAttention on the GPU for the LM masks.  Logs and JSON go to OUTDIR; each step has a time limit.
#
#   bash benchmarks/gpu.sh [OUTDIR]      (default: gpu-results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {   # step NAME SECONDS COMMAND...: one step, its output in OUTDIR/NAME.log, a time limit, never fatal
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s"
  tail -n 40 "$out/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$py -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
EDGEATTN_DEPLOY_MATRIX="$out/deploy.jsonl" step tests 170 $py -m pytest -m gpu -p no:cacheprovider -rs -q \
  tests/test_runtimes.py tests/test_precision.py tests/test_deploy.py
step attention 150 $py benchmarks/bench_attention.py --runtimes ort-cuda --device cuda --no-flex --runs 50 \
  --json "$out/attention.json"
step models 120 $py benchmarks/bench_models.py --runtimes ort-cuda --runs 50 --json "$out/models.json" \
  --models nat-tiny nat-mini dinat-mini swin-t ppma-t rmt-t mask2former-decoder segment-lm
step flex 90 $py benchmarks/bench_attention.py --runtimes --device cuda --runs 50 \
  --cases sliding-block causal-block na2d-block --json "$out/flex.json"
