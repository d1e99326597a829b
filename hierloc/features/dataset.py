"""The images to encode: compact per-item arrays, read in DataLoader workers (a torch Dataset), and
regrouped on the device into the batches the model takes (``device_batches``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from hierloc.features.decode import DecodePlan

#: (container, member) -> RGB image; called with offset=, size= keywords too where the item has them
#: (a tar member's data position, so the reader seeks straight to it), and min_side= where the
#: backbone decodes JPEGs at reduced scale: geodata.ingest.image_store.ImageStore.open.
OpenImage = Callable[..., "PIL.Image.Image"]  # noqa: F821

#: Images per DataLoader worker batch: workers hand on small chunks, regrouped into the model's
#: batches on the device, so the first batch does not wait for one worker to decode a whole batch
#: and the last ones are not left to a few workers (with 14 workers and batches of 256, a short run
#: of 4,096 images otherwise ends with 2 workers decoding while 12 idle).
WORKER_CHUNK = 32
#: Chunks each worker decodes ahead (DataLoader prefetch_factor).
PREFETCH_CHUNKS = 4


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


def item_location(items: ImageItems, i: int) -> tuple[str, str, dict]:
    """(container, member, {offset, size} where a tar member's position is known, else {}) of item ``i``."""
    container, member = items.containers[items.codes[i]], items.members[i].decode()
    where = {"offset": int(items.offsets[i]), "size": int(items.sizes[i])} if items.offsets[i] >= 0 else {}
    return container, member, where


def failure_reason(items: ImageItems, i: int, exc: Exception) -> str:
    """Why item ``i`` could not be read, naming its container and member."""
    container, member, _ = item_location(items, i)
    return f"{container}:{member}: {type(exc).__name__}: {exc}"


def read_pixels(items: ImageItems, i: int, open_image: OpenImage, plan: DecodePlan) -> torch.Tensor:
    """Item ``i`` opened (at reduced scale where the plan says) and through the plan's worker part:
    (C, H, W) of the plan's shape and dtype; raises what reading or the transform raises."""
    container, member, where = item_location(items, i)
    decode = {"min_side": plan.min_side} if plan.min_side is not None else {}
    x = plan.worker(open_image(container, member, **where, **decode))
    if tuple(x.shape) != plan.shape or x.dtype != plan.dtype:
        raise ValueError(f"transform gave {tuple(x.shape)} {x.dtype}, expected {plan.shape} {plan.dtype}")
    return x


class ImageDataset(Dataset):
    """(id, image tensor (C, H, W) as ``plan.worker`` makes it (uint8 where the transform splits), error
    '' or why it could not be read: then zeros) per item. Holds the plan's worker side only (the device
    part stays in the main process)."""

    def __init__(self, items: ImageItems, open_image: OpenImage, plan: DecodePlan):
        self.items, self.open_image, self.plan = items, open_image, plan.worker_side()

    def __len__(self) -> int:
        return len(self.items.ids)

    def __getitem__(self, i: int):
        image_id = int(self.items.ids[i])
        try:
            return image_id, read_pixels(self.items, i, self.open_image, self.plan), ""
        except Exception as exc:  # reported per image, the batch goes on
            return image_id, torch.zeros(self.plan.shape, dtype=self.plan.dtype), failure_reason(self.items, i, exc)


def takes_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (by name or **kwargs); False where it has no
    signature to read (a builtin: cannot tell)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def check_open_image(open_image: OpenImage, plan: DecodePlan) -> None:
    """TypeError, before any image is read, when the plan decodes at reduced scale and ``open_image``
    takes no ``min_side`` keyword (every image would fail)."""
    if plan.min_side is not None and not takes_keyword(open_image, "min_side"):
        raise TypeError(f"open_image {open_image!r} takes no min_side= keyword, which reduced-scale JPEG decoding "
                        "needs: pass geodata.ingest.image_store.ImageStore.open, or load the backbone with "
                        "fast_decode=False")


def device_batches(items: ImageItems, open_image: OpenImage, plan: DecodePlan, *, batch_size: int, num_workers: int,
                   device: torch.device) -> Iterator[tuple[np.ndarray, torch.Tensor, list[str]]]:
    """The items in order, in batches of ``batch_size`` (the last one shorter), ready for the model:
    (ids (B,) int64, x (B, C, H, W) float32 on ``device``, errors (B,) '' or why). Workers decode
    chunks of WORKER_CHUNK images into pinned memory (on CUDA); each chunk is copied to the device
    without blocking, and the batch is assembled and converted (``plan.to_model``) there."""
    device = torch.device(device)
    loader = DataLoader(ImageDataset(items, open_image, plan), batch_size=min(batch_size, WORKER_CHUNK),
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=PREFETCH_CHUNKS if num_workers else None)
    ids: list[torch.Tensor] = []
    xs: list[torch.Tensor] = []
    errors: list[str] = []
    for c_ids, c_x, c_err in loader:
        ids.append(c_ids)
        xs.append(c_x.to(device, non_blocking=True))
        errors.extend(c_err)
        while len(errors) >= batch_size:
            b_ids, b_x = torch.cat(ids), torch.cat(xs) if len(xs) > 1 else xs[0]
            yield b_ids[:batch_size].numpy().astype(np.int64), plan.to_model(b_x[:batch_size]), errors[:batch_size]
            ids, xs, errors = [b_ids[batch_size:]], [b_x[batch_size:]], errors[batch_size:]
    if errors:
        yield torch.cat(ids).numpy().astype(np.int64), plan.to_model(torch.cat(xs)), errors


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
