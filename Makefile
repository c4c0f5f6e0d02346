# The two Quick-start commands: `make study` (the main job) and `make test` (the test suite).
# Both create the virtual environment on first use. The CPU install pins torch 2.13.0 (a small
# CPU wheel) and removes torchvision, which litdata pulls in but cannot load beside that wheel
# (see README "Install"); every pip resolve brings it back, so the removal follows each one.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: study seed test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[dev]'
	$(BIN)/pip uninstall --yes --quiet torchvision
	$(BIN)/python -c "import bam_lightning.callbacks, lightning, litdata, torchmetrics; print('install ok')"
	touch $(STAMP)

study: $(STAMP)
	$(BIN)/bam pipeline recipes/tiny/study.yaml

test: $(STAMP)
	$(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)
