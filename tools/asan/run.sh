#!/usr/bin/env bash
# make asan: the C++ backend's tests under AddressSanitizer. Builds csrc/ with ASan (CMake
# DLKERNELS_ASAN=ON: -fsanitize=address, dlk_asan_shim.h for the masked and streamed accesses, no LTO)
# into a copy of the package under .asan/, then runs every test of the cpp backend there, once as is
# and once with a tiny LLC (DLKERNELS_LLC_BYTES) so that every pass takes its streamed, non-temporal
# paths. Any ASan report fails the run and is printed. About 7 minutes on 2 cores (4 the build; the
# 2026-11-29 run: 1438 + 1320 tests, no report).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OUT=$ROOT/.asan
rm -rf "$OUT/src" "$OUT/logs"
mkdir -p "$OUT/src" "$OUT/build" "$OUT/logs"
# the package and its tests, without the native build (the ASan one replaces it); run from there, so
# that `import dlkernels` finds this copy before the editable install
cp -r dlkernels tests pyproject.toml "$OUT/src/"
rm -f "$OUT/src/dlkernels/"_C*.so
GEN=()
command -v ninja > /dev/null && GEN=(-GNinja)
cmake -S "$ROOT" -B "$OUT/build" "${GEN[@]}" -DDLKERNELS_ASAN=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$OUT/src/dlkernels" -DPython_EXECUTABLE="$PY" \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" > "$OUT/logs/cmake.log"
cmake --build "$OUT/build" -j "$(nproc)" > "$OUT/logs/build.log"

# libstdc++ preloaded beside libasan: without it ASan's __cxa_throw interceptor finds no real
# function (torch's libraries load it later) and the first C++ exception aborts the process.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:halt_on_error=0:log_path=$OUT/logs/asan"
cd "$OUT/src"
"$PY" -c 'import dlkernels, sys; assert dlkernels.__file__.startswith(sys.argv[1]), dlkernels.__file__' "$OUT/src"
# tests/test_build.py builds the portable library with the compiler, which must not run under ASan.
# A test that fails (or a worker that dies in a bad access) does not stop the run before the reports.
status=0
"$PY" -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup -k cpp --ignore tests/test_build.py tests || status=$?
DLKERNELS_LLC_BYTES=4096 "$PY" -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup -k cpp \
  tests/test_depthwise.py tests/test_separable.py tests/test_batchnorm.py tests/test_matmul.py || status=$?
if compgen -G "$OUT/logs/asan.*" > /dev/null; then
  cat "$OUT/logs/"asan.* | head -200
  echo "ASan reported errors: $OUT/logs/asan.*" >&2
  exit 1
fi
[ "$status" -eq 0 ] || { echo "tests failed under ASan (no ASan report)" >&2; exit "$status"; }
echo "ASan: no reports"
