"""Write a safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; importing or exporting a 7B
model that way needs the whole model in RAM (twice, with the source). The format is simple (an
8-byte header length, a JSON header of names, dtypes, shapes and byte offsets, then the raw
little-endian tensors in header order), so the header is written from the shapes alone and each
tensor is produced, written and dropped in turn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from bam_lightning.checkpoint import SAFETENSORS_DTYPES, write_atomically

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass
class PlannedTensor:
    """One tensor to write: its name, final shape and dtype, and how to make it (called once)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def write_safetensors(path: str | os.PathLike, tensors: Iterable[PlannedTensor],
                      metadata: dict[str, str] | None = None,
                      progress: Callable[[int, int, str], None] | None = None) -> None:
    """Write `tensors` (in this order) to `path` atomically, holding one tensor at a time.

    Each `make()` result must have the planned shape and dtype: the header is already on disk.
    """
    planned = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for item in planned:
        if item.name in header:
            raise ValueError(f"{path}: tensor {item.name!r} planned twice")
        size = item.dtype.itemsize * _numel(item.shape)
        header[item.name] = {"dtype": DTYPE_NAMES[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned: readers may map them

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for number, item in enumerate(planned, 1):
                tensor = item.make()
                if tuple(tensor.shape) != tuple(item.shape) or tensor.dtype != item.dtype:
                    raise ValueError(f"{path}: tensor {item.name!r} came out {tuple(tensor.shape)} "
                                     f"{tensor.dtype}, planned {tuple(item.shape)} {item.dtype}")
                data = tensor.detach().to("cpu").contiguous()
                if data.numel():
                    handle.write(data.reshape(-1).view(torch.uint8).numpy().data)
                if progress is not None:
                    progress(number, len(planned), item.name)

    write_atomically(path, write)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def progress_printer(label: str) -> Callable[[int, int, str], None]:
    """A `progress` callback printing `label: n/N tensors` at every quarter of the way."""
    printed = set()

    def report(number: int, total: int, name: str) -> None:
        quarter = number * 4 // total
        if quarter not in printed and (quarter > 0 or number == total):
            printed.add(quarter)
            print(f"{label}: {number}/{total} tensors", flush=True)

    return report
