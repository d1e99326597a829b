"""Frozen image encoders, named by a spec string, each with a content key of its weights.

Specs:

- ``fixed:pixelstats``: a cheap, deterministic, weight-free descriptor (colour means on an
  8x8 grid, per-channel histograms, gradient energy on a 4x4 grid) for the embedded demo,
  where no pretrained weights exist offline.
- ``open_clip:<arch>``: an open_clip image tower (``visual``; the text tower is dropped).
  ``<arch>`` is an open_clip model name, or the path of a model config ``.json`` (open_clip's
  format) for an architecture open_clip does not ship. ``pretrained`` is a local weights file,
  or an open_clip tag, which downloads: only when the user names one.
- ``timm:<name>``: a timm model with ``num_classes=0`` (pooled features); ``pretrained`` is a
  local weights file (the classifier is dropped), never a hub download.
- ``precomputed:<name>``: features written by the WebDataset ingest; no encoder
  (hierloc.features.views.load_features reads them; ``load_backbone`` refuses this spec).

Without ``pretrained`` the weights are a random init drawn from a fixed seed, so two runs
build the same model. ``Backbone.weights_key`` hashes the weights actually loaded (every
tensor of the state dict), the input transform and reduced-scale JPEG decoding (``fast_decode``):
the feature cache is keyed by it, so changing the weights file, the tag, the library's init or
the decoding never reuses stale features.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hierloc.features.decode import DecodePlan, plan_decoding
from hierloc.features.device_decode import DeviceDecodePlan, plan_device_decoding
from hierloc.model.io import MAX_WEIGHTS_FILE_BYTES, load_plain, open_regular

SPEC_KINDS = ("fixed", "open_clip", "timm", "precomputed")
#: Where JPEGs are decoded: PIL in the DataLoader workers, or decode_jpeg on the device.
DECODERS = ("pil", "device")


class PixelStats(nn.Module):
    """Weight-free image descriptor: (B, 3, S, S) in [0, 1] -> (B, 232)."""

    dim = 8 * 8 * 3 + 3 * 8 + 4 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = F.adaptive_avg_pool2d(x, 8).flatten(1)  # colour layout
        bins = torch.clamp((x * 8).long(), 0, 7)  # 8 bins per channel; x == 1.0 would be bin 8
        hist = F.one_hot(bins, 8).float().mean(dim=(2, 3)).flatten(1)  # (B, 3*8)
        gray = x.mean(1, keepdim=True)
        gx = (gray[..., :, 1:] - gray[..., :, :-1]).abs()
        gy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
        grad = F.adaptive_avg_pool2d(gx[..., :-1, :] + gy[..., :, :-1], 4).flatten(1)
        return torch.cat([grid, hist, grad], dim=1)


@dataclass
class Backbone:
    """A frozen image encoder: ``transform`` (PIL RGB image -> (3, H, W) float tensor) and ``module``
    ((B, 3, H, W) -> (B, dim) features). ``fast_decode``: the feature stage decodes JPEGs at reduced
    scale where the transform starts with a Resize (hierloc.features.decode; False: full
    resolution, the features of a full decode exactly); ``decoding`` is how it splits the transform
    between DataLoader workers and the device. ``decoder``: "pil" (JPEGs decoded by PIL in the workers) or
    "device" (workers read bytes, JPEGs decoded by torchvision's decode_jpeg on the extraction device:
    nvjpeg on CUDA; hierloc.features.device_decode; its own cache key)."""

    spec: str
    module: nn.Module
    transform: Callable
    dim: int
    fast_decode: bool = True
    decoder: str = "pil"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"backbone {self.spec}: decoder {self.decoder!r}: use one of {', '.join(DECODERS)}")

    @cached_property
    def decoding(self) -> DecodePlan:
        """The transform split into a worker part (uint8) and a device part, and the JPEG draft size."""
        return plan_decoding(self.transform, fast_decode=self.fast_decode)

    @cached_property
    def device_decoding(self) -> DeviceDecodePlan:
        """The device decoder's plan (decoder "device"); ValueError for a transform it cannot run."""
        return plan_device_decoding(self.decoding)

    @cached_property
    def weights_key(self) -> str:
        """sha256 hex of the weights, the transform and the decoding (``weights_key()``); computed on
        first use (about a second per GB of weights), so a predictor that only encodes never pays it.
        Reduced-scale decoding changes the features, so it changes the key; a full decode keeps the key
        the features had before reduced-scale decoding existed (they are the same features)."""
        min_side = self.decoding.min_side
        decode = "" if min_side is None else f"jpeg-draft:{min_side}"
        if self.decoder == "device":  # JPEGs decoded in full by decode_jpeg, resized as tensors
            decode = f"jpeg-device:{self.device_decoding.geometry}|others:{decode or 'full'}"
        return weights_key(self.module, self.transform, decode=decode)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dim) float32."""
        return self.module(x).float()

def parse_spec(spec: str) -> tuple[str, str]:
    """'kind:name' -> (kind, name); ValueError naming the accepted forms."""
    kind, _, name = spec.partition(":")
    if kind not in SPEC_KINDS or not name or (kind == "fixed" and name != "pixelstats"):
        raise ValueError(f"unknown backbone spec {spec!r}: use 'fixed:pixelstats', 'open_clip:<arch or config.json>', "
                         "'timm:<model name>' or 'precomputed:<feature folder name>'")
    return kind, name


def weights_key(module: nn.Module, transform: Callable, *, decode: str = "") -> str:
    """sha256 hex of every state-dict tensor (name, dtype, shape, bytes), of the transform's repr and
    of ``decode`` (how images are decoded before the transform; '' for a full decode)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    # Function reprs carry memory addresses (open_clip's _convert_to_rgb): not part of the content.
    h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform)).encode())
    if decode:  # appended only when set: keys of fully decoded features stay what they were
        h.update(f"|decode={decode}".encode())
    return h.hexdigest()


def _pixelstats_transform(size: int = 64) -> Callable:
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True),
                       v2.ToDtype(torch.float32, scale=True)])


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Run ``build`` with torch's CPU generator seeded, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _open_clip(name: str, pretrained: str | None, seed: int) -> tuple[nn.Module, Callable, int]:
    import open_clip

    if name.endswith(".json"):  # a config file for an architecture open_clip does not ship
        cfg = Path(name)
        if not cfg.is_file():
            raise FileNotFoundError(f"backbone open_clip:{name}: no such model config file")
        open_clip.add_model_config(cfg)
        name = cfg.stem
    if name not in open_clip.list_models():
        raise ValueError(f"backbone open_clip:{name}: unknown architecture; see open_clip.list_models() "
                         "or give the path of a model config .json")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained and not Path(pretrained).is_file() and pretrained not in tags:
        raise FileNotFoundError(f"backbone open_clip:{name}: pretrained weights {pretrained!r} are neither a file "
                                f"nor an open_clip tag of this architecture")
    if pretrained and Path(pretrained).is_file():  # open_clip reads it with weights_only=True; capped here first
        os.close(open_regular(pretrained, what="backbone weights file", max_bytes=MAX_WEIGHTS_FILE_BYTES))
    model, _, preprocess = _seeded(
        lambda: open_clip.create_model_and_transforms(name, pretrained=pretrained or None), seed)
    visual = model.visual  # encode_image(x) == visual(x): the text tower is never used
    return visual, preprocess, int(visual.output_dim)


def _timm_state_dict(path: Path) -> dict:
    """A checkpoint file's state dict, unwrapped from the usual {'state_dict': ...} / {'model': ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        os.close(open_regular(path, what="backbone weights file", max_bytes=MAX_WEIGHTS_FILE_BYTES))
        return load_file(str(path))
    sd = load_plain(path, what="backbone weights file", max_bytes=MAX_WEIGHTS_FILE_BYTES)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            return sd[key]
    return sd


def _load_timm_weights(model: nn.Module, name: str, pretrained: str) -> None:
    """A local checkpoint into a timm model built with ``num_classes=0``: its classifier head is
    dropped, every other key must fit (ValueError naming the missing / unexpected ones)."""
    sd = _timm_state_dict(Path(pretrained))
    own = model.state_dict()
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = tuple(h + "." for h in ([head] if isinstance(head, str) else head))
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(heads)}  # num_classes=0 drops the head
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{pretrained}: does not fit timm:{name}: {len(missing)} missing keys (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                         "check the model name matches the checkpoint")
    model.load_state_dict(sd, strict=True)


def _timm(name: str, pretrained: str | None, seed: int) -> tuple[nn.Module, Callable, int]:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ValueError(f"backbone timm:{name}: unknown model; see timm.list_models()")
    if pretrained and not Path(pretrained).is_file():
        raise FileNotFoundError(f"backbone timm:{name}: pretrained weights {pretrained!r} is not a file "
                                "(timm weights are read from a local file only, never downloaded)")
    model = _seeded(lambda: timm.create_model(name, pretrained=False, num_classes=0), seed)
    if pretrained:
        _load_timm_weights(model, name, pretrained)
    transform = create_transform(**resolve_model_data_config(model))
    return model, transform, int(model.num_features)


def load_backbone(spec: str, pretrained: str | None = None, *, seed: int = 0, fast_decode: bool = True,
                  decoder: str = "pil") -> Backbone:
    """Build a frozen backbone from its spec (module docstring), in eval mode on the CPU.

    ``pretrained``: a local weights file (open_clip also takes one of its tags); None for a
    random init drawn with ``seed``. ``fast_decode``: reduced-scale JPEG decoding in the feature
    stage (``Backbone``; False: today's full decode, exactly its features); ``decoder``: "pil" or
    "device" (``Backbone``; ValueError up front where the transform does not suit it). Raises ValueError for
    an unknown spec and for ``precomputed:`` (features without an encoder), FileNotFoundError for
    missing weights.
    """
    kind, name = parse_spec(spec)
    if kind == "fixed":
        module, transform, dim = PixelStats(), _pixelstats_transform(), PixelStats.dim
    elif kind == "open_clip":
        module, transform, dim = _open_clip(name, pretrained, seed)
    elif kind == "timm":
        module, transform, dim = _timm(name, pretrained, seed)
    else:
        raise ValueError(f"backbone {spec!r}: precomputed features have no image encoder; compute them with the "
                         "backbone they came from, or pass features instead of images")
    bb = Backbone(spec, module.eval().requires_grad_(False), transform, dim, fast_decode, decoder)
    if decoder == "device":
        bb.device_decoding  # noqa: B018 - refuse an unsuitable transform now, not in the stage
    return bb
