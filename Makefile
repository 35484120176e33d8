PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip's own progress: one line per package and a bar per download (no -q: the CUDA wheels of
# torch are about 3 GB, and minutes of silence look like a hang).
PIP := $(BIN)/pip install --progress-bar on
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed
# The CPU-only torch wheels (no CUDA libraries): see README, "Install".
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install install-serve install-cpu serve test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip

# What serving needs: torch, transformers, FastAPI, ... (pyproject's dependencies).
$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	@echo ">>> installing the serving dependencies into $(VENV) (torch with its CUDA libraries is a download of about 3 GB; 'make install-cpu' is the smaller CPU-only install)"
	$(PIP) -e .
	touch $@

# Development and CI: serving plus the test extras (pytest, openai, matplotlib, selenium, ...).
$(DEV_STAMP): $(SERVE_STAMP)
	@echo ">>> adding the development extras"
	$(PIP) -e '.[dev]'
	touch $@

install: $(DEV_STAMP)

install-serve: $(SERVE_STAMP)

# CPU-only serving install: torch from the CPU wheel index first, then the project.
install-cpu: | $(BIN)/python
	@echo ">>> installing CPU-only torch from $(TORCH_CPU_INDEX)"
	$(PIP) --index-url $(TORCH_CPU_INDEX) "torch==$$($(BIN)/python -c "import re; print(re.search(r'\"torch==([^\"]+)\"', open('pyproject.toml').read()).group(1))")" \
		"torchvision==$$($(BIN)/python -c "import re; print(re.search(r'\"torchvision==([^\"]+)\"', open('pyproject.toml').read()).group(1))")"
	$(PIP) -e .
	touch $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/lightvlm serve --host 127.0.0.1 --port 8000

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -x

clean:
	rm -rf $(VENV)
