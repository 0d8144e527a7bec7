# One-command setup: every target creates .venv when missing and installs the project into it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FULL    ?= 0

MIN_VENV := .venv-min

.PHONY: setup demo test test-min wheel bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned to the CPU build on this machine's disk; any other version pulls CUDA wheels.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m rewriter.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

# The declared lower bounds (pyproject, pinned exactly by tools/min_requirements.py) in their own
# venv (with the images and finetune extras at their floors), then the fast tests.
test-min:
	test -x $(MIN_VENV)/bin/python || $(PY) -m venv $(MIN_VENV)
	$(PY) tools/min_requirements.py images finetune > $(MIN_VENV)/min-requirements.txt
	$(MIN_VENV)/bin/python -m pip install -q -r $(MIN_VENV)/min-requirements.txt \
		"pytest>=8" "hypothesis>=6.100" "jsonschema>=4" "scikit-learn>=1.3"
	$(MIN_VENV)/bin/python -m pip install -q --no-deps -e .
	$(MIN_VENV)/bin/python -m pip list 2>/dev/null | grep -i -E "^(onnx|onnx-ir|onnxruntime|numpy|rich|pillow) "
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider

# A clean wheel (the log must show no warnings) in dist/.
wheel: $(STAMP)
	$(BIN)/python -m build --wheel --outdir dist .

bench: $(STAMP)
	$(BIN)/python -m bench.run $(if $(filter 1,$(FULL)),--full,)

lint: $(STAMP)
	$(BIN)/ruff check rewriter passes models tests bench tools

clean:
	rm -rf $(VENV) $(MIN_VENV) build dist *.egg-info
