"""Tiny fixtures shared by tests: configs, random dense weights, dense checkpoint files, text
domains, and a reader of prepared data that does not use litdata."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import torch

from bam_lightning.config import ModelConfig
from bam_lightning.model import GPT


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` inside, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_config(**overrides) -> ModelConfig:
    """A dense config small enough for many CPU tests a second; override any field."""
    values = dict(vocab_size=50, n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=16)
    values.update(overrides)
    return ModelConfig(**values)


def moe_config(dense: ModelConfig, **mixture) -> ModelConfig:
    """The mixture of `dense` with the given mixture fields (n_experts, attn_experts, ...)."""
    return dataclasses.replace(dense, **mixture)


def random_dense_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random (norms too), so sources built from different seeds differ everywhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in GPT(config).state_dict().items()}
    return {key: torch.randn(shape, generator=generator) * 0.2 + (1.0 if "norm" in key else 0.0)
            for key, shape in shapes.items()}


def save_lightning_checkpoint(path: Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                              tokenizer: str | None = None) -> Path:
    """Write the layout DenseLM/MoELM checkpoints have (what `read_checkpoint` reads)."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in state_dict.items()},
                "hyper_parameters": {"config": config.to_dict()},
                "bam_lightning": {"tokenizer": tokenizer}}, path)
    return path


def dense_sources(directory: Path, config: ModelConfig, n: int, first_seed: int = 0) -> list[Path]:
    """`n` different dense checkpoints of `config` in `directory`."""
    return [save_lightning_checkpoint(directory / f"dense{j}.ckpt", config,
                                      random_dense_state_dict(config, first_seed + j))
            for j in range(n)]


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the plain formula, autograd's own backward: the independent check on the fused
    `apply_rope`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def read_prepared_split(split_dir: Path, dtype: str) -> tuple[np.ndarray, list[int], np.ndarray]:
    """A prepared split read without litdata, as an independent reference: litdata's chunk file
    is a uint32 item count, count + 1 uint32 byte offsets, then the items' raw tokens. Returns the
    split's whole token sequence, the tokens per chunk and the document offsets."""
    index = json.loads((split_dir / "index.json").read_text())
    parts, chunk_tokens = [], []
    for chunk in index["chunks"]:
        raw = (split_dir / chunk["filename"]).read_bytes()
        count = int(np.frombuffer(raw, dtype=np.uint32, count=1)[0])
        assert count == chunk["chunk_size"]
        parts.append(np.frombuffer(raw, dtype=dtype, offset=4 * (count + 2)))
        chunk_tokens.append(len(parts[-1]))
    return np.concatenate(parts), chunk_tokens, np.load(split_dir / "documents.npy")


def write_domains(root: Path) -> dict[str, str]:
    """Three small, distinct text domains."""
    texts = {
        # distinct documents: near-duplicates would be grouped on one side of the split
        "alpha": [" ".join(random.Random(i).choices(["the", "cat", "sat", "on", "a", "mat"], k=120))
                  for i in range(12)],
        "digits": [" ".join(str((i * 7 + j) * (j + 3) % 97) for j in range(200)) for i in range(12)],
        "code": [f"def f{i}(x):\n    return x * {i} + {i}\n" * 15 for i in range(12)],
    }
    domains = {}
    for name, docs in texts.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i, doc in enumerate(docs):
            (folder / f"{i}.txt").write_text(doc)
        domains[name] = str(folder / "*.txt")
    return domains


def write_word_documents(root: Path) -> Path:
    """Four small word documents in `root/words` (one domain for recipe tests)."""
    (root / "words").mkdir()
    for i in range(4):
        (root / "words" / f"{i}.txt").write_text(" ".join(f"word{(i * j) % 13}" for j in range(300)))
    return root / "words"


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """(exit code, output) of a command started with `start_new_session=True`; past `timeout`
    its whole process group (every rank it launched) is killed and the test fails, never hangs."""
    import pytest

    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not finish in {timeout} s:\n{output[-4000:]}")
    return process.returncode, output
