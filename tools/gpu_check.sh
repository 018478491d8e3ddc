#!/usr/bin/env bash
# The GPU path on a lent GPU machine (one GPU, Python 3.12, CUDA torch and transformers, no megatron-core, no network).
#
#   bash tools/gpu_check.sh --prepare   # here: megatron-core's py3.12 wheel and the pure-Python config stack into
#                                       # .gpu_check/wheels (git-ignored, ~3 MB: well inside the 64 MiB that travels)
#   bash tools/gpu_check.sh             # there (carry .gpu_check): installs the wheels into .gpu_check/site and
#                                       # runs tools/gpu_check.py; results in $OUT/gpu_check.json and $OUT/gpu_check.log;
#                                       # then the speed benchmarks on a random 8-layer Qwen3 (hidden 1024) in bf16:
#                                       # megatron vs transformers fwd+bwd ($OUT/bench_learner.log) and fixed vs
#                                       # token-budget/packed micro-batches ($OUT/bench_micro_batching.log)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_check/wheels
# Versions pinned as in pyproject.toml / the CPU venv; antlr4 4.9.3 exists only as an sdist, so it is built here.
PACKAGES=(megatron-core==0.16.1 hydra-core==1.3.2 omegaconf==2.3.0)

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  python3 -m pip download "${PACKAGES[@]}" --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d "$WHEELS"
  python3 -m pip wheel antlr4-python3-runtime==4.9.3 --no-deps -w "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi

PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if ! compgen -G "$WHEELS/megatron_core-*.whl" > /dev/null; then
  echo "no $WHEELS: run 'bash tools/gpu_check.sh --prepare' on the build machine and carry .gpu_check" >&2
  exit 2
fi
"$PYTHON" -m pip install --quiet --no-index --no-deps --target .gpu_check/site "$WHEELS"/*.whl
export PYTHONPATH="$PWD/.gpu_check/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check.log"
set -o pipefail
status=0
"$PYTHON" tools/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_check.log" || status=$?
BENCH_MODEL=$(mktemp -d)/random_qwen3
"$PYTHON" tools/gpu_check.py --random-model "$BENCH_MODEL"
"$PYTHON" tools/bench_learner.py --model "$BENCH_MODEL" --dtype bfloat16 --batch 8 --seq 2048 --warmup 3 --iters 10 \
  2>&1 | tee "$OUT/bench_learner.log" || status=$?
"$PYTHON" tools/bench_micro_batching.py --model "$BENCH_MODEL" --dtype bfloat16 --sequences 96 --median-response 768 \
  --max-response 6144 --micro-batch-size 4 --iters 3 2>&1 | tee "$OUT/bench_micro_batching.log" || status=$?
exit $status
