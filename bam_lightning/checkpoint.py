"""Reading model checkpoints (Lightning `.ckpt` or `.safetensors`) and loading weights.

Every error names the file and, where there is one, the key; nothing here touches Lightning's
training state. Weights load into a plain module or an FSDP2-sharded one alike.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from bam_lightning.config import ModelConfig

MODEL_PREFIX = "model."  # the LightningModule holds the GPT as `self.model`
SAFETENSORS_CONFIG_KEY = "bam_lightning.config"


@dataclass
class SourceCheckpoint:
    path: str
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # GPT keys (no "model." prefix)
    tokenizer: str | None = None

    def check_compatible(self, config: ModelConfig, what: str, tokenizer: str | None = None) -> None:
        """The checkpoint must have exactly `config`'s dense shapes (for branching)."""
        problem = describe_config_mismatch(self.config, config)
        if problem:
            raise ValueError(f"{self.path}: checkpoint does not match {what}: {problem}")
        if tokenizer and self.tokenizer and tokenizer != self.tokenizer:
            raise ValueError(f"{self.path}: checkpoint was trained with tokenizer {self.tokenizer!r}, "
                             f"but the data module uses {tokenizer!r}")


def describe_config_mismatch(stored: ModelConfig, expected: ModelConfig) -> str:
    """'' when equal, else the differing fields and which kind (dense/MoE) each side is."""
    diffs = [f"{f.name}: checkpoint {getattr(stored, f.name)!r} vs expected {getattr(expected, f.name)!r}"
             for f in fields(ModelConfig) if getattr(stored, f.name) != getattr(expected, f.name)]
    if not diffs:
        return ""
    kinds = ""
    if stored.is_moe != expected.is_moe:
        kinds = (f"the checkpoint is a {'mixture' if stored.is_moe else 'dense'} model, expected a "
                 f"{'mixture' if expected.is_moe else 'dense'} one; ")
    return kinds + "; ".join(diffs)


def read_checkpoint(path: str | os.PathLike) -> SourceCheckpoint:
    """Load a model checkpoint's config and weights, memory-mapped where the format allows."""
    path = str(path)
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a sharded (distributed) checkpoint directory; save the source with "
                         "ModelParallelStrategy(save_distributed_checkpoint=False) or convert it with "
                         "torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises many types for truncated/corrupt files
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict' key)")
    stored = raw.get("hyper_parameters", {}).get("config")
    if stored is None:
        raise ValueError(f"{path}: checkpoint has no 'hyper_parameters.config' (not saved by bam_lightning)")
    config = ModelConfig.from_dict(dict(stored), source=f"{path}: hyper_parameters.config")
    state = {k[len(MODEL_PREFIX):]: v for k, v in raw["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    tokenizer = raw.get("bam_lightning", {}).get("tokenizer")
    return SourceCheckpoint(path, config, state, tokenizer)


def _read_safetensors(path: str) -> SourceCheckpoint:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise ValueError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from error
    if SAFETENSORS_CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: safetensors metadata has no {SAFETENSORS_CONFIG_KEY!r} entry")
    config = ModelConfig.from_dict(json.loads(metadata[SAFETENSORS_CONFIG_KEY]), source=f"{path}: metadata")
    return SourceCheckpoint(path, config, state, metadata.get("bam_lightning.tokenizer"))


def save_safetensors(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str | os.PathLike,
                     tokenizer: str | None = None) -> None:
    """Write weights + config atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {SAFETENSORS_CONFIG_KEY: json.dumps(config.to_dict())}
    if tokenizer:
        metadata["bam_lightning.tokenizer"] = tokenizer
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_model_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a full (unsharded) state dict into `model`, sharded by FSDP2 or not.

    Keys must match exactly; a missing or unexpected key is an error naming it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))
