# Every target does its own set-up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build this project is tested with; pyproject.toml only asks for ranges.
# Override on your machine, e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,export,thermal,slurm,serve]"
	touch $@

test: venv
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/unip demo --out demo_out

bench: venv
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/analysis_overhead.py
	$(PY) benchmarks/pretrain_throughput.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
