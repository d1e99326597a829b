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


#: Bytes of activations per element of one level's materialised (B x N) loss, forward and backward
#: (distances, haversines in float64 then float32, weights, logits, softmax, their gradients), with margin.
BYTES_PER_PLAIN_ELEM = 128


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (bytes, as the driver reports it); None for the CPU."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def plain_loss_max_elems(device: torch.device, cpu_default: int) -> int:
    """Up to how many (B x N_l) elements a level's loss is materialised rather than streamed.

    The CPU keeps ``cpu_default`` (a constant tuned there: RAM bandwidth, not room, decides). On a
    GPU, materialising is far faster (tens of kernels instead of a few per chunk of entities, forward
    and backward): allowed while a level's matrices fit in half the free memory, measured once
    when training starts."""
    free = free_device_bytes(device)
    if free is None:
        return cpu_default
    return max(cpu_default, free // (2 * BYTES_PER_PLAIN_ELEM))


def entity_chunk_rows(device: torch.device, n_rows: int, width: int, cpu_default: int) -> int | None:
    """Rows per activation-checkpointed chunk of the entity MLP (HierLocModel.entity_chunk).

    ``width``: floats of activations per entity row (the MLP's input and hidden widths). The CPU
    keeps ``cpu_default`` (bounded RSS at OSV-5M scale); a GPU with room for the whole table's
    activations in a quarter of its free memory runs it in one piece (None), skipping the
    recomputation in the backward pass."""
    free = free_device_bytes(device)
    if free is None or n_rows * width * 4 * 2 > free // 4:
        return cpu_default
    return None
