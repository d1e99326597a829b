"""The images to encode as a torch Dataset: compact per-item arrays, read in DataLoader workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from hierloc.features.backbones import Backbone

#: (container, member) -> RGB image; called with offset=, size= keywords too where the item has them
#: (a tar member's data position, so the reader seeks straight to it): geodata.ingest.image_store.ImageStore.open.
OpenImage = Callable[..., "PIL.Image.Image"]  # noqa: F821


@dataclass
class ImageItems:
    """Images to encode as compact arrays (no per-item Python objects: forked workers share the
    pages): ids (N,) int64, codes (N,) int32 into ``containers``, members (N,) bytes, offsets and
    sizes (N,) int64 (-1: none)."""

    ids: np.ndarray
    codes: np.ndarray
    containers: list[str]
    members: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray


class ImageDataset(Dataset):
    """(id, transformed image (C, H, W), error '' or why it could not be read) per item."""

    def __init__(self, items: ImageItems, open_image: OpenImage, transform: Callable, shape: tuple[int, ...]):
        self.items, self.open_image, self.transform, self.shape = items, open_image, transform, shape

    def __len__(self) -> int:
        return len(self.items.ids)

    def __getitem__(self, i: int):
        it = self.items
        container, member, image_id = it.containers[it.codes[i]], it.members[i].decode(), int(it.ids[i])
        where = {"offset": int(it.offsets[i]), "size": int(it.sizes[i])} if it.offsets[i] >= 0 else {}
        try:
            x = self.transform(self.open_image(container, member, **where))
            if tuple(x.shape) != self.shape:
                raise ValueError(f"transform gave shape {tuple(x.shape)}, expected {self.shape}")
            return image_id, x, ""
        except Exception as exc:  # reported per image, the batch goes on
            return image_id, torch.zeros(self.shape), f"{container}:{member}: {type(exc).__name__}: {exc}"


def probe_shape(backbone: Backbone) -> tuple[int, ...]:
    """(C, H, W) of what the backbone's transform makes of an image (the shape a failed read fills)."""
    from PIL import Image

    return tuple(backbone.transform(Image.new("RGB", (640, 480))).shape)


def compact_items(ids: np.ndarray, containers: np.ndarray, members: np.ndarray, offsets: np.ndarray | None,
                  sizes: np.ndarray | None) -> ImageItems:
    """The items sorted by container, so workers read one shard at a time (stable within one)."""
    codes, names = pd.factorize(containers)  # hashing: millions of rows, a few hundred shards
    order = np.argsort(codes, kind="stable")
    members_b = np.char.encode(np.asarray(members, dtype=str), "utf-8")
    none = np.full(len(ids), -1, np.int64)
    offsets = none if offsets is None else np.asarray(offsets, np.int64)
    sizes = none if sizes is None else np.asarray(sizes, np.int64)
    return ImageItems(ids[order], codes[order].astype(np.int32), [str(c) for c in names], members_b[order],
                      offsets[order], sizes[order])
