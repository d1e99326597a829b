"""How the feature stage decodes: the backbone's transform split between DataLoader workers and the device.

Today's transforms (open_clip's preprocess, timm's eval transform, ``fixed:pixelstats``) resize,
crop, turn the image into a float tensor and normalise it, all in a worker. ``plan_decoding``
splits such a transform at its float conversion:

- the **worker part** (``DecodePlan.worker``): the steps before the conversion (resize, crop, RGB
  conversion: PIL or uint8 tensor operations, run as before), then the pixels as a uint8 (C, H, W)
  tensor: a quarter of float32's bytes through the workers' queues, pinned memory and the bus;
- the **device part** (``DecodePlan.to_model``): on the collated batch after ``.to(device)``: to
  float32 and scaled to [0, 1] (ToTensor's ``div(255)``, or the ToDtype / ConvertImageDtype step
  itself), then Normalize (``sub(mean).div(std)``, as torchvision computes it) - the same float32
  operations in the same order, so the model gets bit-identical input (checked on a probe image
  when the plan is made; a transform whose split differs there runs whole in the workers).

Recognised: a torchvision (v1 or v2) ``Compose`` with one float conversion (v1/v2 ``ToTensor`` and
subclasses such as open_clip's and timm's ``MaybeToTensor``, ``v2.ToDtype`` to a float dtype, v1
``ConvertImageDtype``), followed by Normalize steps only. Anything else runs whole in the workers,
as before (``DecodePlan.split`` False).

**Reduced-scale JPEG decoding** (``min_side``): when the transform's first geometric step is a
Resize (open_clip: shortest side to 224; timm: to its crop size over crop_pct; pixelstats: to
64x64), a JPEG needs no more pixels than that: it is decoded at 1/2, 1/4 or 1/8 scale with both
sides >= the size the Resize makes (geodata.ingest.image_decode.decode_image ``min_side``; a
909x512 OSV-5M photo at 455x256 for 224), so the resize that follows only ever downscales; a PIL
Resize then takes its output size from the photo's full size and its source from the photo's
exact extent in the reduced pixels (``info["draft_box"]``), so the geometry is the full decode's.

How close (the 22 OSV-5M sample photos; tests/hierloc/features/test_decode.py): after open_clip's
224 px resize and crop, pixels (in [0, 1]) differ by at most 0.137, 0.0044 on average, and the
features of a random-init ViT-B-32 keep a cosine similarity >= 0.99981 (mean 0.99995) with a full
decode's. That is the resize tolerance: the same photos resized bilinear instead of bicubic differ by
0.114 at most, 0.0037 on average, cosine >= 0.99986. (Resizing the reduced image whole instead of
its exact extent: 0.48, 0.0056, 0.9989.) pixelstats resizes a tensor (no exact extent): 0.29,
0.0075, cosine >= 0.99988. ``fast_decode=False`` keeps the full decode: today's exact features.
The backbone's cache key records the choice (hierloc.features.backbones.Backbone.weights_key), so
features of the two are never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

#: Steps that keep the image's size, allowed before the Resize that sets ``min_side``: torchvision's
#: type conversions (``_tv``), and open_clip's / timm's RGB and tensor conversions, by name (neither
#: library is imported here).
_SIZE_KEEPING_NAMES = {"MaybeConvertMode", "MaybeToTensor", "MaybePILToTensor", "_convert_to_rgb"}
#: PIL modes whose pixels are 8 bits per channel (pil_to_tensor gives exactly ToTensor's values * 255).
_EIGHT_BIT_MODES = {"L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _tv():
    """torchvision's transform modules (v1, v2), imported when a plan is first made."""
    from torchvision import transforms
    from torchvision.transforms import v2

    return transforms, v2


@dataclass(frozen=True)
class DecodePlan:
    """How images reach the model: ``worker`` (PIL RGB image -> (C, H, W) tensor of ``dtype``, in
    DataLoader workers), ``to_model`` ((B, C, H, W) batch on the device -> float32 model input),
    ``min_side`` (JPEGs decoded at reduced scale with both sides >= it; None: full resolution),
    ``shape`` (C, H, W) and ``dtype`` of the worker's output, ``split`` (False: the whole transform
    runs in the worker, as before)."""

    worker: Callable
    to_model: Callable[[torch.Tensor], torch.Tensor]
    min_side: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    split: bool

    def worker_side(self) -> DecodePlan:
        """This plan without its device part: what a DataLoader worker holds (the device part keeps its
        constants on the device once used, which a worker must not inherit)."""
        return replace(self, to_model=_identity)


def resized_size(size: tuple[int, int], resize_to: Sequence[int], max_size: int | None = None) -> tuple[int, int]:
    """(width, height) that torchvision's Resize(resize_to, max_size=...) gives an image of ``size`` (w, h)
    (torchvision.transforms.functional's rule: the shorter side to ``resize_to[0]``, the longer scaled
    and truncated, then capped by ``max_size``; or (h, w) exactly)."""
    w, h = size
    if len(resize_to) == 2:
        return int(resize_to[1]), int(resize_to[0])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(resize_to[0]), int(int(resize_to[0]) * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), int(max_size)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _resize_reduced(image, step):
    """``step`` (a Resize) on a JPEG decoded at reduced scale, as it would resize the full-resolution
    image: the output size from the photo's full size, and the photo's exact extent in the reduced
    pixels as the source box (geodata.ingest.image_decode.decode_image's info full_size and draft_box).
    Without this, a 909 px wide photo decoded at 455 px (454.5 of them photo) would resize to 398 px,
    not 397: every pixel after it shifted (pixels off by up to 0.48 instead of 0.14 of the range)."""
    size = [step.size] if isinstance(step.size, int) else list(step.size)
    target = resized_size(image.info["full_size"], size, step.max_size)
    return image.resize(target, _pil_resample(step), box=image.info["draft_box"])


def _pil_resample(step):
    """PIL's resampling filter of a Resize step (as torchvision resizes a PIL image), or None (no PIL twin)."""
    from PIL import Image

    return Image.Resampling.__members__.get(getattr(step.interpolation, "name", ""))


class _Steps:
    """The worker part: the transform's steps before its float conversion, then the pixels as uint8.
    ``resize_at``: the index of the first step, a Resize, which a reduced-scale JPEG takes from its
    full size (``_resize_reduced``); None: every step runs as it is."""

    def __init__(self, steps: Sequence[Callable], to_uint8: bool, resize_at: int | None = None):
        self.steps, self.to_uint8, self.resize_at = list(steps), to_uint8, resize_at

    def __call__(self, image) -> torch.Tensor:
        for k, step in enumerate(self.steps):
            reduced = k == self.resize_at and "draft_box" in getattr(image, "info", {})
            image = _resize_reduced(image, step) if reduced and _pil_resample(step) is not None else step(image)
        if self.to_uint8:  # ToTensor's pixels, before its div(255)
            if not hasattr(image, "mode"):
                raise TypeError(f"the float conversion expects a PIL image here, got {type(image).__name__}")
            if image.mode not in _EIGHT_BIT_MODES:
                raise ValueError(f"image mode {image.mode!r} is not 8 bits per channel; the worker hands on uint8")
            from torchvision.transforms.functional import pil_to_tensor

            image = pil_to_tensor(image)
        return image

    def __repr__(self) -> str:
        return f"WorkerPart({self.steps}, to_uint8={self.to_uint8})"


class _OnDevice:
    """The device part: float conversion and normalisation on the batch, float32, the same operations as
    torchvision's (ToTensor: ``to(float32).div(255)``; Normalize: ``sub(mean).div(std)``). The 255 is a
    tensor on the device, not a Python number: CUDA divides by a host scalar as a multiplication by its
    reciprocal (one bit off at times), by a tensor with IEEE division, as the CPU does."""

    def __init__(self, convert: Callable | None, normalize: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.convert, self.normalize = convert, list(normalize)
        self._on: dict[torch.device, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        consts = self._on.get(x.device)
        if consts is None:  # moved once per device, not per batch
            consts = self._on[x.device] = (torch.tensor(255.0, device=x.device),
                                           [(m.to(x.device), s.to(x.device)) for m, s in self.normalize])
        scale, stats = consts
        x = x.to(torch.float32).div_(scale) if self.convert is None else self.convert(x)
        for mean, std in stats:
            x = x.sub_(mean).div_(std)
        return x


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _steps_of(transform: Callable) -> list[Callable] | None:
    T, v2 = _tv()
    return list(transform.transforms) if isinstance(transform, (T.Compose, v2.Compose)) else None


def _is_size_keeping(step: Callable) -> bool:
    T, v2 = _tv()
    types = (T.PILToTensor, T.ToTensor, T.ConvertImageDtype, v2.PILToTensor, v2.ToImage, v2.ToDtype, v2.ToPureTensor,
             v2.ToTensor)
    names = {getattr(step, "__name__", None), type(step).__name__}  # functions by name, objects by class
    return isinstance(step, types) or bool(names & _SIZE_KEEPING_NAMES)


def _first_resize(steps: Sequence[Callable]) -> int | None:
    """Index of the first step if it is a Resize to a given size (after size-keeping conversions only)."""
    T, v2 = _tv()
    for k, step in enumerate(steps):
        if isinstance(step, (T.Resize, v2.Resize)):
            size = step.size  # v2: None when only max_size caps the longest side
            return k if size is not None and len([size] if isinstance(size, int) else size) in (1, 2) else None
        if not _is_size_keeping(step):
            return None
    return None


def draft_min_side(transform: Callable) -> int | None:
    """The size both sides of a decoded image need for the transform's first Resize to only downscale:
    S for a shortest-side resize to S, max(h, w) for a resize to (h, w); None when the transform does
    not start with a Resize (after size-keeping conversions) - then no reduced-scale decoding."""
    steps = _steps_of(transform) or []
    k = _first_resize(steps)
    if k is None:
        return None
    size = steps[k].size
    return int(max([size] if isinstance(size, int) else size))


def _float_conversion(step: Callable) -> tuple[bool, Callable | None] | None:
    """(worker ends with uint8 from PIL, device conversion or None for div(255)) if ``step`` turns
    the image into floats in a way the device can do on the batch; else None."""
    T, v2 = _tv()
    if isinstance(step, (T.ToTensor, v2.ToTensor)):
        return True, None
    if isinstance(step, v2.ToDtype) and isinstance(step.dtype, torch.dtype) and step.dtype.is_floating_point:
        return False, step
    if isinstance(step, T.ConvertImageDtype) and step.dtype.is_floating_point:
        return False, step
    return None


def _split(transform: Callable) -> tuple[_Steps, _OnDevice] | None:
    T, v2 = _tv()
    steps = _steps_of(transform)
    if steps is None:
        return None
    for k, step in enumerate(steps):
        conv = _float_conversion(step)
        if conv is None:
            continue
        normalize = []
        for after in steps[k + 1 :]:
            if not isinstance(after, (T.Normalize, v2.Normalize)):
                return None
            mean = torch.as_tensor(after.mean, dtype=torch.float32)
            std = torch.as_tensor(after.std, dtype=torch.float32)
            normalize.append((mean.view(-1, 1, 1) if mean.ndim == 1 else mean,
                              std.view(-1, 1, 1) if std.ndim == 1 else std))
        return _Steps(steps[:k], to_uint8=conv[0], resize_at=_first_resize(steps[:k])), _OnDevice(conv[1], normalize)
    return None


def probe_image():
    """A fixed 640x480 RGB test image (noise over gradients): what a plan is checked on."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    base = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], -1)
    noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


def plan_decoding(transform: Callable, *, fast_decode: bool = True, split: bool = True) -> DecodePlan:
    """How to decode for ``transform`` (module docstring). ``fast_decode``: reduced-scale JPEG decoding
    where the transform starts with a Resize; ``split``: uint8 in the workers, float conversion and
    normalisation on the device where the transform is recognised (False, or unrecognised: the whole
    transform in the workers). The split is kept only if it reproduces the whole transform exactly
    on a probe image."""
    min_side = draft_min_side(transform) if fast_decode else None
    img = probe_image()
    whole = transform(img)
    parts = _split(transform) if split else None
    if parts is not None:
        worker, on_device = parts
        try:
            x = worker(img)
            same = x.dtype == torch.uint8 and torch.equal(on_device(x[None])[0], whole)
        except Exception:  # a step that cannot run split: keep the whole transform in the worker
            same = False
        if same:
            return DecodePlan(worker, on_device, min_side, tuple(x.shape), x.dtype, True)
    steps = _steps_of(transform)
    if min_side is not None and steps is not None:  # whole in the worker, the first Resize from the full size
        transform = _Steps(steps, to_uint8=False, resize_at=_first_resize(steps))
    return DecodePlan(transform, _identity, min_side, tuple(whole.shape), whole.dtype, False)
