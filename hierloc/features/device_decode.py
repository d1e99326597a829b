"""JPEGs decoded on the device (``Backbone.decoder == "device"``): workers only read bytes, the main
process decodes each batch with ``torchvision.io.decode_jpeg(list, device=...)`` (batched nvjpeg on
CUDA; libjpeg-turbo on the CPU), then resizes, centre-crops and normalises on the device.

- **Workers** (``EncodedDataset``): ``open_image(container, member, raw=True)`` (geodata's
  ImageStore.open: the bytes after the byte cap, the header's format, size and EXIF orientation
  after the pixel cap, no pixel decoded); a JPEG is handed on as a 1-D uint8 tensor of its bytes.
  Any other format (PNG, WebP, ...) is decoded in the worker by the PIL path
  (``Backbone.decoding``'s worker part: uint8 pixels) and handed on decoded.
- **Main process** (``device_decoded_batches``): the batch's JPEGs are decoded in calls of at most
  MAX_DECODE_PIXELS pixels (by their headers); if a call fails, its images are decoded one by one,
  and a JPEG the decoder refuses (CMYK on nvjpeg, a corrupt stream) is read again through the PIL
  path in the main process; one PIL cannot decode either gets zeros and its reason (NaN features
  downstream), as on the PIL path. EXIF orientation is applied from the header's tag (flips and
  transposes of the tensor, PIL's exif_transpose; decode_jpeg's ``apply_exif_orientation`` exists on
  the CPU only). Then, grouped by size, the backbone's Resize (the same output size as torchvision
  gives, its interpolation, antialias) and CenterCrop on the uint8 tensors (rounded back to uint8, as
  PIL's resize gives), then the plan's device part (``/255``, Normalize).

Recognised transforms: size-keeping conversions, one Resize (shortest side or (h, w)), an optional
CenterCrop, then the float conversion and Normalize (open_clip's preprocess, timm's eval transform,
``fixed:pixelstats``); others raise ValueError when the plan is made.

How close to the PIL full decode (the 22 OSV-5M sample photos, open_clip's 224 px preprocess;
tests/hierloc/features/test_device_decode.py), on the CPU: model inputs in [0, 1] differ by at most
1/255 (0.0039), 1e-5 on average (libjpeg-turbo decodes as PIL does; torch's uint8 antialiased
bicubic resize is PIL's filter), and the features of a random-init ViT keep a cosine >= 0.9999998
with the PIL path's: far inside the resize tolerance (hierloc.features.decode: bilinear vs bicubic
differs by 0.114 / 0.0037). On CUDA nvjpeg's IDCT and a float resize differ more (not measured yet;
the CUDA test allows 0.1 / 0.005, cosine >= 0.9995). The backbone's cache key records the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hierloc.features.dataset import (
    PREFETCH_CHUNKS, WORKER_CHUNK, ImageItems, OpenImage, failure_reason, item_location, read_pixels, takes_keyword,
)
from hierloc.features.decode import DecodePlan, _first_resize, _is_size_keeping, _tv, resized_size

#: Pixels (width x height, by the headers) decoded in one decode_jpeg call: 128 Mpx is 384 MB of RGB
#: output (274 OSV-5M photos of 909x512); a batch over it is decoded in several calls.
MAX_DECODE_PIXELS = 128_000_000
#: What a worker hands on per item: the encoded bytes, the pixels decoded by the PIL path, or nothing.
ENCODED, PIXELS, FAILED = 0, 1, 2


@dataclass(frozen=True)
class Geometry:
    """The worker part of a transform as tensor steps: ``resize`` (its size argument), ``max_size``,
    ``interpolation`` (torchvision's InterpolationMode), ``crop`` ((h, w) of the CenterCrop; None)."""

    resize: tuple[int, ...]
    max_size: int | None
    interpolation: object
    crop: tuple[int, int] | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> resized and cropped, uint8."""
        from torchvision.transforms.v2 import functional as TF

        w, h = resized_size((x.shape[-1], x.shape[-2]), self.resize, self.max_size)
        x = TF.resize(x, [h, w], interpolation=self.interpolation, antialias=True)
        return x if self.crop is None else TF.center_crop(x, list(self.crop))


@dataclass(frozen=True)
class DeviceDecodePlan:
    """``pixels``: the PIL plan (its worker part for other formats and refused JPEGs, its device part
    ``to_model`` for every image); ``geometry``: the resize and crop of decoded JPEGs."""

    pixels: DecodePlan
    geometry: Geometry


def plan_device_decoding(pixels: DecodePlan) -> DeviceDecodePlan:
    """The device decoder for a PIL plan whose worker part is a Resize and an optional CenterCrop
    ending in uint8 (module docstring); ValueError naming the steps otherwise."""
    T, v2 = _tv()
    steps = list(getattr(pixels.worker, "steps", []))
    k = _first_resize(steps) if pixels.split else None
    rest = steps[k + 1:] if k is not None else []
    crop = [s for s in rest if isinstance(s, (T.CenterCrop, v2.CenterCrop))]
    if k is None or len(crop) > 1 or any(not _is_size_keeping(s) for s in rest if s not in crop):
        raise ValueError(f"decoder 'device' needs a transform of Resize, CenterCrop, float conversion and Normalize; "
                         f"got worker steps {steps} (split {pixels.split}): use decoder 'pil'")
    r = steps[k]
    size = (r.size,) if isinstance(r.size, int) else tuple(r.size)
    c = None
    if crop:
        cs = crop[0].size
        c = (int(cs), int(cs)) if isinstance(cs, int) else (int(cs[0]), int(cs[-1]))
    return DeviceDecodePlan(pixels, Geometry(size, r.max_size, r.interpolation, c))


def check_raw_open_image(open_image: OpenImage) -> None:
    """TypeError, before any image is read, when ``open_image`` takes no ``raw`` keyword."""
    if not takes_keyword(open_image, "raw"):
        raise TypeError(f"open_image {open_image!r} takes no raw= keyword, which the device decoder needs: pass "
                        "geodata.ingest.image_store.ImageStore.open, or use decoder 'pil'")


class EncodedDataset(Dataset):
    """Per item (index, kind, tensor, orientation, pixels, error): ENCODED with the JPEG's bytes (1-D
    uint8), PIXELS with the PIL path's uint8 (C, H, W), FAILED with an empty tensor and why."""

    def __init__(self, items: ImageItems, open_image: OpenImage, plan: DecodePlan):
        self.items, self.open_image, self.plan = items, open_image, plan.worker_side()

    def __len__(self) -> int:
        return len(self.items.ids)

    def __getitem__(self, i: int):
        container, member, where = item_location(self.items, i)
        try:
            enc = self.open_image(container, member, **where, raw=True)
            if enc.format == "JPEG":
                data = torch.frombuffer(bytearray(enc.data), dtype=torch.uint8)
                return i, ENCODED, data, enc.orientation, enc.size[0] * enc.size[1], ""
            return i, PIXELS, read_pixels(self.items, i, self.open_image, self.plan), 1, 0, ""
        except Exception as exc:  # reported per image, the batch goes on
            return i, FAILED, torch.zeros(0, dtype=torch.uint8), 1, 0, failure_reason(self.items, i, exc)


def as_lists(batch: list[tuple]) -> tuple[list, ...]:
    """Collate: the items' fields as lists (tensors of different lengths are not stacked)."""
    return tuple(map(list, zip(*batch)))


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as PIL's ImageOps.exif_transpose turns an image with this EXIF orientation (1-8)."""
    if orientation in (2, 4):
        return x.flip(-1 if orientation == 2 else -2)
    if orientation == 3:
        return x.flip(-1).flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def _decode_jpegs(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """Decoded (3, H, W) uint8 per JPEG on ``device``, or the exception that refused it: one batched call,
    and one call per image when it fails (a batch call fails whole)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    try:
        return list(decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device))
    except Exception:
        if len(data) == 1:
            try:
                return [decode_jpeg(data[0], mode=ImageReadMode.RGB, device=device)]
            except Exception as exc:
                return [exc]
        return [r for d in data for r in _decode_jpegs([d], device)]


def _calls(pixels: Sequence[int], cap: int) -> Iterator[slice]:
    """Consecutive slices of at most ``cap`` pixels each (one image over it alone)."""
    start, total = 0, 0
    for k, p in enumerate(pixels):
        if k > start and total + p > cap:
            yield slice(start, k)
            start, total = k, 0
        total += p
    if start < len(pixels):
        yield slice(start, len(pixels))


def decode_batch(chunk: tuple[list, ...], items: ImageItems, open_image: OpenImage, plan: DeviceDecodePlan,
                 device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """One batch of worker items -> (B, C, H, W) uint8 on ``device`` (the worker part's output) and errors."""
    idx, kinds, tensors, orients, pixels, errors = chunk
    errors = list(errors)
    out: list[torch.Tensor | None] = [None] * len(idx)
    jpeg = [k for k, kind in enumerate(kinds) if kind == ENCODED]
    decoded: list[torch.Tensor | Exception] = []
    for s in _calls([pixels[k] for k in jpeg], MAX_DECODE_PIXELS):
        decoded += _decode_jpegs([tensors[k] for k in jpeg[s]], device)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, img in zip(jpeg, decoded):
        if isinstance(img, Exception):  # refused here: the PIL path in this process
            kinds[k] = PIXELS
            try:
                tensors[k] = read_pixels(items, idx[k], open_image, plan.pixels)
            except Exception as exc:
                kinds[k], errors[k] = FAILED, failure_reason(items, idx[k], exc)
            continue
        tensors[k] = orient(img, orients[k])
        groups.setdefault(tuple(tensors[k].shape), []).append(k)
    for ks in groups.values():  # one resize per size (OSV-5M photos mostly share a few)
        x = plan.geometry(torch.stack([tensors[k] for k in ks]))
        for k, xk in zip(ks, x):
            out[k] = xk
    shape = plan.pixels.shape
    for k, kind in enumerate(kinds):
        if kind == PIXELS:
            out[k] = tensors[k].to(device, non_blocking=True)
        elif kind == FAILED:
            out[k] = torch.zeros(shape, dtype=torch.uint8, device=device)
        elif tuple(out[k].shape) != shape:
            errors[k] = failure_reason(items, idx[k], ValueError(f"decoded to {tuple(out[k].shape)}, expected {shape}"))
            out[k] = torch.zeros(shape, dtype=torch.uint8, device=device)
    return torch.stack(out), errors


def device_decoded_batches(items: ImageItems, open_image: OpenImage, plan: DeviceDecodePlan, *, batch_size: int,
                           num_workers: int, device: torch.device,
                           ) -> Iterator[tuple[np.ndarray, torch.Tensor, list[str]]]:
    """As hierloc.features.dataset.device_batches (ids, model-ready x on ``device``, errors), the JPEGs
    decoded on ``device`` a whole batch at a time (module docstring)."""
    device = torch.device(device)
    loader = DataLoader(EncodedDataset(items, open_image, plan.pixels), batch_size=min(batch_size, WORKER_CHUNK),
                        num_workers=num_workers, collate_fn=as_lists,
                        prefetch_factor=PREFETCH_CHUNKS if num_workers else None)
    pending: list[list] = [[] for _ in range(6)]

    def emit(n: int):
        chunk = tuple(field[:n] for field in pending)
        for field in pending:
            del field[:n]
        x, errors = decode_batch(chunk, items, open_image, plan, device)
        return items.ids[np.asarray(chunk[0], np.int64)], plan.pixels.to_model(x), errors

    for got in loader:
        for field, values in zip(pending, got):
            field.extend(values)
        while len(pending[0]) >= batch_size:
            yield emit(batch_size)
    if pending[0]:
        yield emit(len(pending[0]))

