# Two commands: `make demo` and `make test`. Both build .venv from constraints.txt first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV := $(VENV)/checkov/.installed
export DS_ACCELERATOR ?= cpu

.PHONY: venv demo test soak models clean mutation compiler audit

venv: $(STAMP)

# torch first and pinned: a resolver left alone pulls several GB of CUDA wheels. Then DeepSpeed
# with its one CPU op (the shared-memory allreduce of its CPU accelerator) built into .venv now,
# as cluster/Dockerfile builds its GPU ops: left alone, every new virtualenv's first job would
# JIT-build it into ~/.cache/torch_extensions (~40 s, every Ray worker waiting on the build),
# and two checkouts on one machine would rebuild it there in turn (torch keys it by name only).
# --no-cache-dir: a wheel pip built earlier without the op would otherwise be reused.
$(STAMP): pyproject.toml constraints.txt | compiler
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch setuptools wheel ninja packaging
	DS_BUILD_SHM_COMM=1 $(BIN)/pip install -q --no-build-isolation --no-cache-dir \
	  -c constraints.txt deepspeed
	$(BIN)/python -c "from deepspeed.git_version_info import installed_ops as ops; \
	  assert ops.get('deepspeed_shm_comm'), 'DeepSpeed CPU op not prebuilt'"
	$(BIN)/pip install -q -c constraints.txt -e ".[test,mutation]"
	touch $(STAMP)

# DeepSpeed's CPU op is compiled at install with ninja (a Python dependency, in .venv) and the
# system C++ compiler (torch runs $CXX, else c++), which a fresh machine may lack.
compiler:
	@command -v $${CXX:-c++} >/dev/null || { echo "make: no C++ compiler ($${CXX:-c++}) on PATH:" \
	  "DeepSpeed builds a small C++ op on CPU. Install one: sudo apt-get install g++" \
	  "(Debian/Ubuntu), sudo dnf install gcc-c++ (Fedora), or set CXX" >&2; exit 1; }

# checkov, the Kubernetes policy scanner the cluster tests run over every manifest, pins its own
# boto3, packaging and networkx (older than ours): it gets an environment of its own.
$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install -q --upgrade pip
	$(VENV)/checkov/bin/pip install -q 'checkov==3.3.30'
	touch $@

# The job builds its digits shards itself on first use (in ~/.cache/t2t-dist).
demo: $(STAMP)
	$(BIN)/python jobs/pretrain.py --config jobs/configs/demo.yaml

models: $(STAMP)
	$(BIN)/t2t-dist models

# The default run: everything that needs no GPU and no Slurm install. Two pytest processes
# (pytest-xdist), each with its own Ray cluster, each taking whole test modules (a module's
# fixtures, e.g. its trained runs, are built once) in the order tests/conftest.py gives them:
# the Ray-heavy modules first. TEST_WORKERS=0 runs in this process alone.
TEST_WORKERS ?= 2
test: $(STAMP) $(CHECKOV)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The soak tests, not part of `make test`: a node lost and regrown on a two-node Ray cluster
# on this host (~7-9 min on 2 cores), and the chaos run (~25-30 min; README, "Tests").
soak: $(STAMP)
	$(BIN)/python -m pytest -m soak -s

# Mutation testing, not part of `make test`: mutmut breaks one spot at a time in optim, engine,
# checkpoint, data/order and data/loader and runs the fast tests that reach it ([tool.mutmut] in
# pyproject.toml). ~1,500 mutants: over an hour on 2 cores (650 took 26 min); one module:
# `$(BIN)/mutmut run "t2t_dist.optim*"`.
# Then `$(BIN)/mutmut results` lists the survivors, `$(BIN)/mutmut show NAME` the change.
mutation: $(STAMP)
	rm -rf mutants  # mutmut keeps stale copies of changed sources
	$(BIN)/mutmut run --max-children $$(nproc)
	$(BIN)/mutmut results

# Known vulnerabilities in every version we pin (not part of `make test`: it needs PyPI's JSON
# API or OSV over the network). pip-audit in its own environment, so it audits only the pins;
# --strict: a pin it cannot look up fails the audit instead of passing unchecked.
audit:
	$(PYTHON) -m venv $(VENV)/audit
	$(VENV)/audit/bin/pip install -q 'pip-audit>=2.10'
	$(VENV)/audit/bin/pip-audit -r constraints.txt --no-deps --disable-pip --strict --progress-spinner off

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts
