# Two entry points from a fresh clone:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DOCS ?= 3000
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: setup demo test bench clean

$(BIN)/quantlake: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch first: otherwise a dependency pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/quantlake

demo: setup
	$(BIN)/python -m jobs.demo lake/docs --docs $(DEMO_DOCS) --files 4
	$(BIN)/quantlake ingest lake/docs lake/emb --id-column id --calibration-samples 1000
	$(BIN)/quantlake search lake/emb --neighbours-of 3

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: setup
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/float_types.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/watch.py

clean:
	rm -rf lake out
