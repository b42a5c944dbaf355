# The two commands of the README:
#   make demo   install into .venv and run the example training job (4 ranks, then resume on 2)
#   make test   install into .venv, lint (ruff), type-check (mypy) and run the whole test suite
# The pinned CPU torch is installed first, so pip never resolves a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) launch/demo.py

test: install
	bash .ci/system-deps.sh
	$(PY) -m ruff check dist_ckpt tests benchmarks launch
	$(PY) -m ruff format --check dist_ckpt tests benchmarks launch
	$(PY) -m mypy dist_ckpt
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/bench_checkpoint.py --world 4 --reshard-world 2,3 --total-mb 512

clean:
	rm -rf $(VENV) build *.egg-info
