# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Take the CPU build of torch from a local wheel folder where the machine offers one, so that pip never
# pulls CUDA packages onto a CPU machine. Elsewhere, point TORCH_PIP_ARGS at a CPU wheel index or folder.
TORCH_PIP_ARGS ?= $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,)

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_PIP_ARGS) "torch==2.13.0"
	$(BIN)/pip install $(TORCH_PIP_ARGS) -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/supportforge run configs/demo.toml

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache runs
