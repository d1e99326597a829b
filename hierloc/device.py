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
