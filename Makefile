# make test   set up everything on a fresh machine (venv, deps, C++ build), then run the tests
# make bench  the same set-up, then the benchmark and accuracy report (python -m dlkernels bench)
# make asan   the cpp backend's tests under AddressSanitizer (tools/asan/run.sh)
# All are idempotent: a second run skips the set-up unless requirements, csrc/ or the CPU changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.stamp-deps
BUILD  := $(VENV)/.stamp-build
# The C++ is built with -march=native: a different CPU (sessions move between machines) needs a rebuild.
CPU_ID := $(shell grep -m1 -E '^(model name|flags)' /proc/cpuinfo | md5sum | cut -c1-12)
CPU_STAMP := $(VENV)/.stamp-cpu-$(CPU_ID)
CSRC   := $(wildcard csrc/*.cpp csrc/*.h) CMakeLists.txt setup.py pyproject.toml

# Large buffers stay in the process instead of going back to the OS after each op (page faults
# would otherwise dominate every CPU timing, torch's included). glibc ignores an mmap threshold
# above 32 MiB, hence 33554432; the bench also sets these with mallopt() in its own process.
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_TOP_PAD_=268435456

.PHONY: test bench asan setup build clean

test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench: setup
	$(BENCH_ENV) $(PY) -m dlkernels bench $(BENCH_ARGS)

# The cpp backend's tests under AddressSanitizer (tools/asan/run.sh; ~7 minutes, not part of make test)
asan: setup
	tools/asan/run.sh

setup: $(BUILD)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEPS): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(CPU_STAMP): | $(VENV)/bin/python
	rm -f $(VENV)/.stamp-cpu-*
	touch $@

$(BUILD): $(DEPS) $(CPU_STAMP) $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build .asan *.egg-info dlkernels/_C*.so $(BUILD)
