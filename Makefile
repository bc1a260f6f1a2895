# Two commands for a newcomer: `make demo` and `make test`. Both create .venv and build the C++
# extension the first time. The extension is built without build isolation so that it compiles against
# the pinned CPU torch in .venv (an isolated build would fetch another torch).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.deps-installed
EXT_STAMP := $(VENV)/.ext-built
CPP_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)

.PHONY: demo test test-cpp test-py build bench clean

$(DEPS_STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -qq --upgrade pip
	$(PIP) install -qq -r requirements.txt
	touch $@

$(EXT_STAMP): $(DEPS_STAMP) setup.py $(CPP_SOURCES)
	$(PIP) install -qq --no-build-isolation --no-deps -e .
	touch $@

build: $(EXT_STAMP)

demo: build
	$(PY) -m romer_kernels demo

test-cpp: $(DEPS_STAMP)
	cmake --log-level=WARNING -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja
	cmake --build build -- --quiet
	ctest --test-dir build --output-on-failure

test-py: build
	$(PY) -m pytest -q

test: test-cpp test-py

bench: build
	$(PY) -m benchmarks

clean:
	rm -rf build *.egg-info romer_kernels/_C*.so
