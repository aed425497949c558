#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool of this workplace; see benchmarks/gpu/README.md):
# what the card is, the tests on CUDA, the GPU benchmark, the C++ install check. Logs and one
# tarball of the benchmark reports, the install log and the probe's report go to $OUT (it brings
# back at most 8 files); the last lines printed are a summary.
#
#   OUT=/tmp/out benchmarks/gpu/run.sh [steps]     steps: info install first tests bench bench-compile probe
#
# first: FIRST_K (a pytest -k expression) over FIRST_FILES with full tracebacks, before the suite.
# probe: benchmarks/gpu/probe.py (per-kernel profiles, autotuner choices, host cost; PROBE_K).
# tests: TEST_FILES (default tests/) on CUDA. Per-step time limits (seconds) come from TEST_S, BENCH_S, BENCHC_S; the bench's dtype from
# BENCH_DTYPES (default bfloat16), its ops from BENCH_OPS (BENCH_TAG: a suffix for its folder), its torch.compile contender from
# BENCH_COMPILE (default none) and a pytest -k expression from BENCH_K.
set -u
: "${OUT:?set OUT to the folder for logs and results}"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=${*:-info install first tests bench bench-compile probe}
RES=/tmp/dlkernels-gpu-results
mkdir -p "$RES"
say() { echo "== $(date -u +%T) $*"; }
# the reports (and partial.json of a run cut short) travel back as one file: $OUT holds at most 8
pack() { tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
# BENCH_TAG names this call's bench folders and logs, so that several calls of one lease add up
TAG=${BENCH_TAG:+-$BENCH_TAG}

if has info; then
  say info
  { nvidia-smi; $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); p = torch.cuda.get_device_properties(0); print(p.name, 'SMs', p.multi_processor_count, 'L2', getattr(p, 'L2_cache_size', '?'), 'cc', torch.cuda.get_device_capability())"; nproc; } > "$OUT/info.txt" 2>&1
  tail -3 "$OUT/info.txt"
fi

if has install; then
  # the C++ build (pip -e ., CMake, -j nproc) runs beside the CUDA tests; only test_dispatch needs it
  say "install (pip -e ., the C++ build) in the background"
  ( timeout "${INSTALL_S:-150}" $PY -m pip install -q --no-build-isolation --no-deps -e . > "$RES/install.log" 2>&1
    echo "install rc=$?" >> "$RES/install.log" ) &
  INSTALL_PID=$!
fi

if has first && [[ -n "${FIRST_K:-}" ]]; then
  say "first: ${FIRST_K}"
  DLKERNELS_TEST_CUDA=1 DLKERNELS_TRITON_AUTOTUNE=0 timeout "${FIRST_S:-60}" $PY -m pytest -q -p no:cacheprovider \
    -o addopts= --tb=long -k "$FIRST_K" ${FIRST_FILES:-tests} > "$OUT/first.log" 2>&1
  echo "first rc=$?" >> "$OUT/first.log"
  tail -3 "$OUT/first.log"
fi

if has tests; then
  say "tests (CUDA, triton backend, untuned kernels)"
  DLKERNELS_TEST_CUDA=1 DLKERNELS_TRITON_AUTOTUNE=0 DLKERNELS_FAILURE_LOG="$OUT/failures.log" timeout "${TEST_S:-240}" \
    $PY -m pytest -v -n "${TEST_WORKERS:-16}" --dist loadgroup -p no:cacheprovider --timeout 200 -o addopts= -ra \
    ${TEST_FILES:-tests} --deselect tests/test_bench.py --deselect tests/test_dispatch.py ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1
  echo "tests rc=$?" >> "$OUT/tests.log"
  if [[ -n "${INSTALL_PID:-}" ]]; then
    wait "$INSTALL_PID"; tail -1 "$RES/install.log"
    $PY -c "import dlkernels; print('backends', dlkernels.available_backends())" >> "$RES/install.log" 2>&1
    DLKERNELS_TEST_CUDA=1 timeout 60 $PY -m pytest -q -p no:cacheprovider -o addopts= tests/test_dispatch.py >> "$OUT/tests.log" 2>&1
    echo "test_dispatch rc=$?" >> "$OUT/tests.log"
  fi
  # -v: each result is a line as it comes, so a run cut short still names its failures
  grep -E "(FAILED|ERROR) |passed|failed|rc=" "$OUT/tests.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | tail -60
fi

if has bench; then
  say "bench ${BENCH_OPS:-depthwise,separable,pointwise,batchnorm,matmul} ${BENCH_DTYPES:-bfloat16}"
  timeout "${BENCH_S:-300}" $PY -m dlkernels bench --device cuda --dtypes "${BENCH_DTYPES:-bfloat16}" \
    --ops "${BENCH_OPS:-depthwise,separable,pointwise,batchnorm,matmul}" --compile "${BENCH_COMPILE:-none}" \
    --no-progress --out "$RES/bench$TAG" -- ${BENCH_K:+-k "$BENCH_K"} > "$RES/bench$TAG.log" 2>&1
  echo "bench rc=$?" >> "$RES/bench$TAG.log"
  pack
  grep -E "precompile|rc=|FAILED" "$RES/bench$TAG.log" | tail -20
fi

if has bench-compile; then
  # torch.compile's inductor compiles every case afresh (tens of seconds each): training only,
  # where the issue's target names it
  say "bench batch norm training against torch.compile"
  timeout "${BENCHC_S:-200}" $PY -m dlkernels bench --device cuda --dtypes "${BENCH_DTYPES:-bfloat16}" \
    --ops batch_norm_residual --compile auto --no-progress --out "$RES/bench-compile$TAG" -- -k "${BENCHC_K:-train and resnet50}" \
    > "$RES/bench-compile$TAG.log" 2>&1
  echo "bench-compile rc=$?" >> "$RES/bench-compile$TAG.log"
  pack
  grep -E "precompile|rc=|FAILED" "$RES/bench-compile$TAG.log" | tail -10
fi

if has probe; then
  say "probe ${PROBE_K:-(default cases)}"
  PYTHONPATH=. timeout "${PROBE_S:-120}" $PY benchmarks/gpu/probe.py "$RES" ${PROBE_K:+-k "$PROBE_K"} > "$OUT/probe.log" 2>&1
  echo "probe rc=$?" >> "$OUT/probe.log"
  tail -2 "$OUT/probe.log"
fi

pack
say done
