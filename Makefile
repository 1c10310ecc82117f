# Every target creates .venv when it is missing. torch is installed first and pinned, so that pip
# takes the local CPU build instead of resolving a multi-GB CUDA build for a plain `torch`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,plot]"
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hybridssm demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not cuda" --durations=15

test-all: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_mamba.py --out results/bench_mamba.md
	$(PY) benchmarks/bench_models.py --out results/bench_models.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
