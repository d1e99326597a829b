"""The one device resolver: a device spec ('auto', 'cpu', 'cuda', 'cuda:n') -> torch.device."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device, local_rank: int | None = None) -> torch.device:
    """``auto`` = cuda when a GPU is present, else cpu; anything else as ``torch.device(spec)``.

    ``local_rank``: a training rank's GPU (hierloc.train.distributed.setup), taken by a bare
    ``auto``/``cuda``; None (feature extraction) leaves ``cuda`` the current CUDA device.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def return_large_frees(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc serve allocations over ``threshold_bytes`` with their own mappings, returned to
    the OS when freed (mallopt M_MMAP_THRESHOLD, which also stops glibc from raising the
    threshold as it goes). Training frees tensors of tens of MB every step (the loss over the
    full entity table); under the default dynamic threshold they land in the heap, which
    fragments, and the process's RSS creeps up step after step (measured: +0.3 GB a step at
    1M images, 58k entities). False where there is no glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
