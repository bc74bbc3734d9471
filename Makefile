# The two set-up commands of the README: `make demo` and `make test`.
# torch is installed first, pinned, so that pip takes the CPU build on this machine's disk
# instead of pulling a multi-GB CUDA build for the bare `torch>=2.4` requirement.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
OUT ?= demo_output

.PHONY: demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -c "from modeconn_fast.rebasin import lap; lap.warm_up()"  # fills numba's cache: no compiling at first use
	$(PY) -c "from modeconn_fast.engine import compiled_cpu; compiled_cpu.warm_up()"  # the same for the engine's kernels
	touch $@

demo: $(VENV)/.installed
	$(PY) -m modeconn_fast demo --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
