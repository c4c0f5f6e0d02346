"""Keep large CPU blocks on glibc's heap, so training does not page-fault its activations afresh
at every step.

glibc serves every block of 32 MiB or more with a fresh `mmap` and unmaps it on `free`, so each
such activation is page-faulted and zeroed by the kernel again at every step. A mixture's
activations are E times wider than the dense model's and cross that line where the dense ones do
not: at BAM's tiny shapes this cost the attention mixture 12-18% against E dense attentions
(benchmarks/README.md). `bam` therefore starts every run with the equivalent of
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`: large blocks come
from the heap, and freed heap memory is kept for the next step instead of being handed back.
Peak memory is unchanged (a training step reaches the same peak every step); memory freed after
the peak stays with the process until it exits. `BAM_MALLOC=default` keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "BAM_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_large_blocks_on_heap() -> bool:
    """Apply the policy to this process (and the children it forks); False where it cannot be
    applied: not glibc, or no `mallopt`. GPU memory is not affected: CUDA has its own allocator."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False


def apply_malloc_policy() -> str:
    """What `bam` calls first: `heap` unless BAM_MALLOC says `default`; returns what was applied."""
    choice = os.environ.get(ENV_VAR, "heap").strip().lower()
    if choice not in ("heap", "default"):
        raise SystemExit(f"error: {ENV_VAR}={os.environ[ENV_VAR]!r}: expected 'heap' (the default) or 'default'")
    if choice == "default":
        return "default"
    return "heap" if keep_large_blocks_on_heap() else "default (mallopt unavailable)"
