VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test test-slow test-all demo lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,lm-eval,reference]'
	touch $@

venv: $(VENV)/.installed

# One BLAS thread: LAPACK (SVD/QR/eigh) through a multi-threaded OpenBLAS is up to
# 8x slower on a busy 2-core machine (measured: 688x256 SVD 91 ms vs 11 ms).
BLAS_ENV := OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1}

test: venv
	$(BLAS_ENV) $(PY) -m pytest -m "not slow"

# the tests marked slow (CI runs them after `make test`)
test-slow: venv
	$(BLAS_ENV) $(PY) -m pytest -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]  # 5: none collected

test-all: venv
	$(BLAS_ENV) $(PY) -m pytest

demo: venv
	$(BLAS_ENV) $(PY) -m train.demo

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) benchmarks/optimizer_step.py

clean:
	rm -rf $(VENV) build *.egg-info
