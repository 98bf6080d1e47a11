# Two commands: `make demo` and `make test`. Both build .venv from constraints.txt first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: venv demo test test-all models clean

venv: $(STAMP)

# torch first and pinned: a resolver left alone pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[test,mutation]"
	touch $(STAMP)

# The job builds its digits shards itself on first use (in ~/.cache/t2t-dist).
demo: $(STAMP)
	$(BIN)/python jobs/pretrain.py --config jobs/configs/demo.yaml

models: $(STAMP)
	$(BIN)/t2t-dist models

# The default run: everything that needs no GPU and no Slurm install, in well under 15 min on 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts
