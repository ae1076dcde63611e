#!/usr/bin/env bash
# What a lent GPU machine checks, one phase per device call (each well inside its 10-minute limit);
# logs and JSON land in $OUT (the device tool's return folder), else ./gpu_out.
#
#   bash bench/gpu.sh tests            # kernel tests compiled on the GPU (FP8 GEMMs, attention)
#   bash bench/gpu.sh bench            # bench.fp8_gemm --sweep, bench.attention (timed + checked)
#   bash bench/gpu.sh quality [key=value ...] --seeds 0 1 2   # FP8 vs fp32 training pairs (bench.fp8_train)
#     (call it again with the same seeds after the time limit: finished runs are reused, the rest resume;
#      new pairs are appended to $OUT's copy of bench/fp8_train_pairs.jsonl: copy it back; use seeds
#      the file does not hold yet; another experiment than the file's is summarized on its own)
#
# The machine's python3 has JAX and the test tools but not grain (the data loader): `quality`
# installs it from ./.whl, which a session fills beforehand (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # several processes share the GPU
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}  # tests/conftest.py defaults the suite to the CPU
py=${PYTHON:-python3}
phase=${1:?usage: bash bench/gpu.sh tests|bench|quality [key=value ...] --seeds SEED...}
shift
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $py -c 'import jax; print(jax.__version__, jax.devices())'; } > "$out/device.txt" 2>&1

case $phase in
tests)
  # XLA's default optimisation level (3), which tests/conftest.py lowers to 0 unless XLA_FLAGS names one:
  # the kernels are checked compiled as users compile them
  XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=3" \
    timeout 540 $py -m pytest -p no:cacheprovider -n 4 -m accelerator tests/kernels tests/model 2>&1 | tee "$out/tests.log"
  ;;
bench)
  timeout 360 $py -m bench.fp8_gemm --sweep > "$out/fp8_gemm.json" 2> "$out/fp8_gemm.err"
  timeout 200 $py -m bench.attention > "$out/attention.json" 2> "$out/attention.err"
  tail -c 3000 "$out/fp8_gemm.json"
  ;;
quality)
  $py -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache  # every seed's run compiles the same programs: once
  # JOBS runs share the GPU at once (default 3; the tiny step leaves a GPU mostly idle, more may pay)
  timeout 540 $py -m bench.fp8_train --jobs "${JOBS:-3}" --output-dir /tmp/fp8_train "$@" > "$out/fp8_train.json" 2> "$out/fp8_train.err"
  # every pair finished on this machine so far (also when time ran out before this call's JSON), pooled
  # with the repository's record, the new ones appended to it (copy $out/fp8_train_pairs.jsonl back);
  # pairs of another experiment than the record's (other key=value) are summarized alone
  { $py -m bench.fp8_train --summarize /tmp/fp8_train --pairs bench/fp8_train_pairs.jsonl --record \
      || $py -m bench.fp8_train --summarize /tmp/fp8_train; } | tee "$out/fp8_train_summary.json" | head -c 3000
  cp bench/fp8_train_pairs.jsonl "$out/"
  ;;
*)
  echo "unknown phase $phase: tests, bench or quality" >&2
  exit 2
  ;;
esac
