"""Reading and writing model checkpoints (Lightning `.ckpt` or `.safetensors`), loading weights.

Every error names the file and, where there is one, the key. Weights load into a plain module or
an FSDP2-sharded one alike. Every file is written under a temporary name and renamed into place,
so a run killed mid-write keeps its previous checkpoint (`AtomicCheckpointIO`, the `bam` CLI's
default checkpoint plugin).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import glob
import json
import mmap
import os
import secrets
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from bam_lightning.config import ModelConfig
from bam_lightning.errors import DiskFullError, UserError

MODEL_PREFIX = "model."  # the LightningModule holds the GPT as `self.model`
SAFETENSORS_CONFIG_KEY = "bam_lightning.config"


@dataclass
class SourceCheckpoint:
    path: str
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # GPT keys (no "model." prefix)
    tokenizer: str | None = None
    mappings: list[tuple[int, int]] = field(default_factory=list)  # address ranges mapped from `path`
    global_step: int | None = None  # where the fit that wrote it was (None: not recorded, e.g. safetensors)
    max_steps: int | None = None  # where that fit was going
    final: bool | None = None  # whether the fit ended at this checkpoint

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages of a tensor read from this checkpoint (see `release_pages`)."""
        release_pages(tensor, self.mappings)

    def check_compatible(self, config: ModelConfig, what: str, tokenizer: str | None = None) -> None:
        """The checkpoint must have exactly `config`'s dense shapes (for branching)."""
        problem = describe_config_mismatch(self.config, config)
        if problem:
            raise UserError(f"{self.path}: checkpoint does not match {what}: {problem}")
        if tokenizer and self.tokenizer and tokenizer != self.tokenizer:
            raise UserError(f"{self.path}: checkpoint was trained with tokenizer {self.tokenizer!r}, "
                             f"but the data module uses {tokenizer!r}")

    def check_final(self, what: str) -> None:
        """A stage built on this checkpoint must get the end of its fit, not an intermediate step
        (a fit killed before its end, or a `last.ckpt` from before the final save existed).
        Checkpoints that do not record their step (safetensors, other tools) are taken as they are."""
        if self.final is False:
            raise UserError(f"{self.path}: {what} needs the final state of the fit that wrote it, but this "
                             f"checkpoint holds step {self.global_step} of {self.max_steps}; finish that fit "
                             "(re-run it to resume) before starting this one")


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
        # (dcp_to_torch_save would give the weights without the config, which stays in meta.pt)
        raise UserError(f"{path}: is a sharded (distributed) checkpoint directory; save the source as one "
                         "file with ModelParallelStrategy(save_distributed_checkpoint=False)")
    if not Path(path).is_file():
        raise UserError(f"{path}: checkpoint file not found")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises many types for truncated/corrupt files
        raise UserError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(raw, dict) or "state_dict" not in raw:
        raise UserError(f"{path}: not a Lightning checkpoint (no 'state_dict' key)")
    stored = raw.get("hyper_parameters", {}).get("config")
    if stored is None:
        raise UserError(f"{path}: checkpoint has no 'hyper_parameters.config' (not saved by bam_lightning)")
    config = ModelConfig.from_dict(dict(stored), source=f"{path}: hyper_parameters.config")
    state = {k[len(MODEL_PREFIX):]: v for k, v in raw["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    meta = raw.get("bam_lightning", {})
    final = meta.get("final")
    return SourceCheckpoint(path, config, state, meta.get("tokenizer"), file_mappings(path),
                            global_step=meta.get("global_step", raw.get("global_step")),
                            max_steps=meta.get("max_steps"), final=None if final is None else bool(final))


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path: str) -> SourceCheckpoint:
    """Memory-map a safetensors file: tensors are views of the file, read from disk only when used.

    The `safetensors` library copies every tensor it returns into fresh memory; mapping the file
    (the format is an 8-byte header length, a JSON header, then raw little-endian tensors) lets
    streaming upcycling read a source chunk by chunk and give each chunk's pages back
    (`release_pages`), so N sources never sit in RAM at once.
    """
    try:
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if not 2 <= header_size <= min(100_000_000, os.path.getsize(path) - 8):
                raise ValueError(f"header length {header_size} does not fit the file")
            header = json.loads(handle.read(header_size))
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_size
        file_bytes = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
        raw = torch.empty(0, dtype=torch.uint8).set_(file_bytes)
        state = {}
        for key, entry in header.items():
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (data_start + offset for offset in entry["data_offsets"])
            data = raw[begin:end]
            if begin % dtype.itemsize:  # unaligned (not written by a padding writer): copy this one
                data = data.clone()
            state[key] = data.view(dtype).view(entry["shape"])
    except Exception as error:
        raise UserError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from error
    if SAFETENSORS_CONFIG_KEY not in metadata:
        raise UserError(f"{path}: safetensors metadata has no {SAFETENSORS_CONFIG_KEY!r} entry")
    config = ModelConfig.from_dict(json.loads(metadata[SAFETENSORS_CONFIG_KEY]), source=f"{path}: metadata")
    return SourceCheckpoint(path, config, state, metadata.get("bam_lightning.tokenizer"), file_mappings(path))


MADV_DONTNEED = 4  # Linux: drop the pages; a private file mapping reads them from the file again


def file_mappings(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Address ranges this process has mapped from the file at `path` (Linux; [] elsewhere)."""
    try:
        inode, real_path = os.stat(path).st_ino, os.path.realpath(path)
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields_ = line.split(maxsplit=5)
        if len(fields_) == 6 and int(fields_[4]) == inode and fields_[5].strip() == real_path:
            start, end = (int(x, 16) for x in fields_[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Give back the resident pages of a tensor that lies in one of `mappings` (private mappings of
    a checkpoint file), so reading a big source chunk by chunk never holds more than a chunk of it
    in RAM. The data stays readable: touched again, the pages are read from the file. Memory
    outside those mappings is never touched: dropping anonymous pages would zero them.
    """
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not tensor.is_contiguous() or not any(low <= start and end <= high for low, high in mappings):
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def save_safetensors(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str | os.PathLike,
                     tokenizer: str | None = None) -> None:
    """Write weights + config atomically."""
    from safetensors.torch import save_file

    metadata = {SAFETENSORS_CONFIG_KEY: json.dumps(config.to_dict())}
    if tokenizer:
        metadata["bam_lightning.tokenizer"] = tokenizer
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def staging_directory(parent: Path, prefix: str) -> Path:
    """A new hidden folder in `parent` to fill and then rename into place. Unlike a bare
    `tempfile.mkdtemp` (mode 0o700), it gets the mode any folder the user makes gets (0o777 less
    the umask), so the renamed result is as readable as the rest of their files."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)  # the umask applies, as for `mkdir` in a shell
            return path
        except FileExistsError:
            continue


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """`write(tmp)` a temporary file beside `path`, flush it to disk, then rename it over `path`.

    A rename within one directory is atomic, so readers see the old file or the new one, never
    a torn one. The temporary file is removed when `write` fails; a process killed outright
    leaves it behind (hidden, ending in `.tmp`, so no `*.ckpt` glob picks it up), and the next
    write of the same path removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber another writer's file; mode 0o666 leaves permissions to the umask.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        try:
            write(str(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the bytes reach the disk before the name does
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except Exception as error:
            if disk_is_full(error, path.parent):  # measured before the partial file is removed
                raise DiskFullError(disk_full_message(path)) from error
            raise
    finally:
        tmp.unlink(missing_ok=True)


# torch.save reports a write that failed for want of space as "unexpected pos ..." (no errno), so
# a failed write is also called a full disk when its file system has less than this left.
DISK_FULL_MARGIN_BYTES = 1 << 20


def free_bytes(folder: str | os.PathLike) -> float:
    """Bytes this process may still write in `folder`'s file system (root may use the reserve)."""
    try:
        stats = os.statvfs(folder)
    except (AttributeError, OSError):  # no statvfs (Windows), or the folder is gone
        return float("inf")
    blocks = stats.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stats.f_bavail
    return blocks * stats.f_frsize


def disk_is_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """ENOSPC or EDQUOT anywhere in the error's chain, or (torch's errno-less message) no space left."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(folder) < DISK_FULL_MARGIN_BYTES


def disk_full_message(path: Path) -> str:
    free = free_bytes(path.parent)
    where = f"{path} ({free / 1e6:.1f} MB free there)" if free != float("inf") else str(path)
    if not path.exists():
        return f"no space left on device: cannot write {where}; nothing was overwritten. Free some space, then run again."
    then = (f"resume from it (bam fit: --ckpt_path {path}; bam pipeline: run the same command again)"
            if path.suffix == ".ckpt" else "run again")
    return f"no space left on device: cannot write {where}. The previous {path.name} is intact: free some space, then {then}."


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, but a local checkpoint is written beside its target and
    renamed into place, so a kill or a full disk mid-write keeps the previous `last.ckpt`; and a
    checkpoint that cannot be read is named in the error.

    (Lightning's own writer stages the bytes in memory and in the system temp folder, and
    *copies* them into place when that folder is on another filesystem: a kill during the copy
    tears the file.) Remote paths (`s3://`, ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        local_path = _local_path(path)
        if storage_options is not None or local_path is None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomically(local_path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:
            # torch says "Invalid argument", "EOFError" or "weights only load failed" for a torn
            # file; a complete file (a zip archive) that fails keeps torch's own explanation.
            local_path = _local_path(path)
            if local_path is None or zipfile.is_zipfile(local_path):
                raise
            raise UserError(f"{path}: not a readable checkpoint, the file is truncated or corrupt "
                             f"({type(error).__name__}: {error})") from error


def _local_path(path: str | os.PathLike) -> str | None:
    """The path on this machine's filesystem, or None for a remote URL."""
    filesystem, local_path = url_to_fs(str(path))
    return local_path if isinstance(filesystem, LocalFileSystem) else None


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
