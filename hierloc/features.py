"""Frozen backbone features, computed once and cached on disk in resumable shards.

Backbones are named by a spec string:

- ``fixed:pixelstats``: a cheap, deterministic, weight-free descriptor (colour
  means on an 8x8 grid, per-channel histograms, gradient energy on a 4x4 grid) for
  the embedded demo, where no pretrained weights exist offline.
- ``open_clip:<arch>``: an open_clip image tower; ``pretrained`` is a local weights
  file (or an open_clip tag when the machine has network), None for random init.

The cache is ``out_dir/shard-00000.npz`` ... (ids int64, feats float32), each
written atomically, plus ``failures.json`` for images that could not be read.
A killed run resumes at the first missing shard.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from hierloc.atomic import atomic_write_path

log = logging.getLogger(__name__)

OpenImage = Callable[[str, str], "PIL.Image.Image"]  # noqa: F821  (container, member) -> RGB image


class PixelStats(nn.Module):
    """Weight-free image descriptor: (B, 3, S, S) in [0, 1] -> (B, 232)."""

    dim = 8 * 8 * 3 + 3 * 8 + 4 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = F.adaptive_avg_pool2d(x, 8).flatten(1)  # colour layout
        bins = torch.clamp((x * 8).long(), 0, 7)  # 8 bins per channel
        hist = F.one_hot(bins, 8).float().mean(dim=(2, 3)).flatten(1)  # (B, 3*8)
        gray = x.mean(1, keepdim=True)
        gx = (gray[..., :, 1:] - gray[..., :, :-1]).abs()
        gy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
        grad = F.adaptive_avg_pool2d(gx[..., :-1, :] + gy[..., :, :-1], 4).flatten(1)
        return torch.cat([grid, hist, grad], dim=1)


@dataclass
class Backbone:
    """A frozen image encoder and the transform that prepares its input."""

    spec: str
    module: nn.Module
    transform: Callable  # PIL image -> (3, H, W) tensor
    dim: int

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.startswith("open_clip:"):
            return self.module.encode_image(x).float()
        return self.module(x).float()


def _pixelstats_transform(size: int = 64) -> Callable:
    from torchvision.transforms import v2

    return v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)])


def load_backbone(spec: str, pretrained: str | None = None) -> Backbone:
    """Build a frozen backbone from its spec (see module docstring)."""
    kind, _, name = spec.partition(":")
    if kind == "fixed" and name == "pixelstats":
        return Backbone(spec, PixelStats().eval(), _pixelstats_transform(), PixelStats.dim)
    if kind == "open_clip" and name:
        import open_clip

        if pretrained and not Path(pretrained).exists() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise FileNotFoundError(f"backbone {spec}: pretrained weights {pretrained!r} is neither a file nor a known tag")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
        model = model.eval().requires_grad_(False)
        dim = int(model.visual.output_dim)
        return Backbone(spec, model, preprocess, dim)
    raise ValueError(f"unknown backbone spec {spec!r}: use 'fixed:pixelstats' or 'open_clip:<arch>'")


class _ImageDataset(Dataset):
    def __init__(self, items: Sequence[tuple[int, str, str]], open_image: OpenImage, transform: Callable, shape):
        self.items, self.open_image, self.transform, self.shape = items, open_image, transform, shape

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image_id, container, member = self.items[i]
        try:
            return image_id, self.transform(self.open_image(container, member)), ""
        except Exception as exc:  # reported per image, the batch goes on
            return image_id, torch.zeros(self.shape), f"{container}:{member}: {type(exc).__name__}: {exc}"


def extract_features(
    items: Sequence[tuple[int, str, str]],
    open_image: OpenImage,
    backbone: Backbone,
    out_dir: Path,
    *,
    batch_size: int = 256,
    shard_size: int = 8192,
    num_workers: int = 2,
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Encode every (id, container, member) item; resume from existing shards.

    Returns a summary: n, shards, failures, seconds, images_per_s.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    module = backbone.module.to(dev)
    probe_shape = None
    failures: dict[str, str] = {}
    fail_path = out_dir / "failures.json"
    if fail_path.exists():
        failures = json.loads(fail_path.read_text())
    t0, done, n_shards = time.perf_counter(), 0, 0
    for s, start in enumerate(range(0, len(items), shard_size)):
        path = out_dir / f"shard-{s:05d}.npz"
        chunk = items[start : start + shard_size]
        n_shards += 1
        if path.exists():
            done += len(chunk)
            continue
        if probe_shape is None:
            probe_shape = _probe_shape(backbone)
        loader = DataLoader(
            _ImageDataset(chunk, open_image, backbone.transform, probe_shape),
            batch_size=batch_size, num_workers=num_workers, persistent_workers=False,
        )
        ids, feats = [], []
        for batch_ids, x, errors in loader:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                f = backbone.encode(x.to(dev, non_blocking=True)).float().cpu()
            for j, err in enumerate(errors):
                if err:
                    failures[str(int(batch_ids[j]))] = err
                    f[j] = float("nan")
            ids.append(batch_ids.numpy().astype(np.int64))
            feats.append(f.numpy().astype(np.float32))
            done += len(batch_ids)
            if progress is not None:
                progress(done, len(items), time.perf_counter() - t0)
        with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: np.savez would append .npz
            np.savez(fh, ids=np.concatenate(ids), feats=np.concatenate(feats))
        with atomic_write_path(fail_path) as tmp:
            tmp.write_text(json.dumps(failures, indent=1))
    for stale in sorted(out_dir.glob("shard-*.npz"))[n_shards:]:
        stale.unlink()  # left by an earlier, larger run of the same cache
    secs = time.perf_counter() - t0
    if failures:
        log.warning("%d images could not be read; first: %s", len(failures), next(iter(failures.items())))
    return {"n": len(items), "shards": n_shards, "failures": len(failures), "seconds": secs,
            "images_per_s": len(items) / secs if secs > 0 else float("inf")}


def _probe_shape(backbone: Backbone) -> tuple[int, ...]:
    from PIL import Image

    return tuple(backbone.transform(Image.new("RGB", (32, 32))).shape)


def load_features(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a feature cache: (ids (N,) int64, feats (N, D) float32), in item order."""
    paths = sorted(Path(cache_dir).glob("shard-*.npz"))
    if not paths:
        raise FileNotFoundError(f"no feature shards in {cache_dir}: run the features stage first")
    parts = [np.load(p) for p in paths]
    return np.concatenate([p["ids"] for p in parts]), np.concatenate([p["feats"] for p in parts])
