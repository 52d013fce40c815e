# spine-node: `make demo` runs the main job end to end, `make test` runs the tests.
# Both set up everything they need on a fresh machine (a .venv with the project installed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test faults bench-ingest bench-pipeline bench-grader bench-latency soak fuzz clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

system-deps:
	tools/system-deps

demo: install
	$(BIN)/spine-node demo

test: install system-deps
	$(BIN)/python -m pytest

bench-ingest: install system-deps
	$(BIN)/python -m bench.ingest

bench-pipeline: install
	$(BIN)/python -m bench.pipeline

bench-grader: install
	$(BIN)/python -m bench.grader

bench-latency: install system-deps
	$(BIN)/python -m bench.study_latency

soak: install system-deps
	$(BIN)/python -m bench.soak --minutes 10

fuzz: install system-deps
	$(BIN)/python -m bench.fuzz --minutes 10

faults: install system-deps
	$(BIN)/python -m pytest -m faults --faults-json bench/out/faults.json

clean:
	rm -rf $(VENV) var demo-out bench/out
