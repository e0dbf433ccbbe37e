# Two commands set up everything on a fresh machine:
#   make demo   venv + install + build, then the embedded default run (tiny model, CPU)
#   make test   venv + install + build, then the C++ tests and every Python test
VENV ?= .venv
PY := $(VENV)/bin/python
# CMake from PyPI (the test extra), so no system CMake is needed.
CMAKE := $(VENV)/bin/cmake
CTEST := $(VENV)/bin/ctest
# The CPU build; on GPU nodes install the CUDA build of torch first (make TORCH=torch ...).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-python test-cpp test-sanitize bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m zppo_fast.train --run.out_dir runs/demo --run.overwrite true

test: test-cpp test-python

test-python: $(STAMP)
	$(PY) -m pytest -q tests

test-cpp: $(STAMP)
	$(CMAKE) -S . -B build/cpp -DPython_EXECUTABLE=$(abspath $(PY)) >/dev/null
	$(CMAKE) --build build/cpp -j 2
	$(CTEST) --test-dir build/cpp --output-on-failure

# ThreadSanitizer and AddressSanitizer builds of the replay ring's stress test.
test-sanitize: $(STAMP)
	$(CMAKE) -S . -B build/cpp-sanitize -DZPPO_SANITIZE=ON >/dev/null
	$(CMAKE) --build build/cpp-sanitize -j 2
	$(CTEST) --test-dir build/cpp-sanitize --output-on-failure

clean:
	rm -rf build runs .cache $(VENV) *.egg-info
