"""Stage 3, features: frozen backbone features of every manifest image, in one incremental
cache per backbone, and per split a view (the ids and digest train/evaluate read)."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from flows.stages.data_dir import SPLITS
from flows.stages.faults import check_feature_failures
from flows.stages.files import manifest_path, read_manifest
from geodata.ingest.image_store import ImageStore
from hierloc.features.extract import effective_precision, extract_features
from hierloc.features.views import features_digest, write_view
from hierloc.features.backbones import load_backbone, parse_spec
from hierloc.device import resolve_device
from hierloc.features.cache import scan_cache

log = logging.getLogger(__name__)


def _slug(spec: str) -> str:
    """A spec as a folder name: 'open_clip:ViT-L-14' -> 'open_clip-ViT-L-14' (a config path keeps its file name)."""
    kind, _, name = spec.partition(":")
    if name.endswith(".json"):
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{kind}:{name}")


def feature_cache_dir(root: Path, backbone: str, weights: str, precision: str = "fp32") -> Path:
    """The incremental cache of one backbone: ``root/cache/<backbone>-<weights key>[-<precision>]``.

    Keyed by content (hierloc.features.backbones.weights_key), not by image list: every run with the
    same weights adds to, and reads from, the same cache.
    """
    suffix = "" if precision == "fp32" else f"-{precision}"
    return Path(root) / "cache" / f"{_slug(backbone)}-{weights[:16]}{suffix}"


def _precomputed_key(cache: Path) -> str:
    """Fingerprint of a precomputed feature folder: its shards' names, sizes and mtimes."""
    h = hashlib.sha256()
    for p in sorted(cache.glob("shard-*.npz")):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _image_columns(ingest_dir: Path) -> dict[str, pd.DataFrame]:
    """Each split's id and where its image lies (tar rows also carry offset and size)."""
    cols = ("id", "image_container", "image_member", "image_offset", "image_size")
    return {split: read_manifest(manifest_path(ingest_dir, split), cols) for split in SPLITS}


def _precomputed(backbone: str, name: str, ingest_dir: Path) -> dict:
    """The features the WebDataset ingest wrote under ``ingest_dir/features/<name>``."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):  # a folder name, never a path out of ingest_dir
        raise ValueError(f"backbone {backbone}: the name must be a plain folder name under {ingest_dir}/features")
    cache = Path(ingest_dir) / "features" / name
    if not any(cache.glob("shard-*.npz")):
        raise FileNotFoundError(f"backbone {backbone}: no feature shards in {cache}; ingest the WebDataset copy "
                                f"that holds {name}.npy per sample, or pick another backbone")
    return {"cache": cache, "weights": _precomputed_key(cache), "precision": "fp32", "index": scan_cache(cache),
            "encoded_ids": np.zeros(0, np.int64), "summary": {"seconds": 0.0, "images_per_s": float("nan")}}


def _encode(backbone: str, pretrained: str | None, data_dir: Path, manifests: dict[str, pd.DataFrame],
            out_root: Path, device: str, precision: str, fast_decode: bool = True, decoder: str = "pil",
            **extract_kwargs) -> dict:
    """Encode the images the backbone's cache lacks (both splits in one pass)."""
    bb = load_backbone(backbone, pretrained, fast_decode=fast_decode, decoder=decoder)
    device = resolve_device(device)
    precision = effective_precision(device, precision)
    cache = feature_cache_dir(Path(out_root), backbone, bb.weights_key, precision)
    union = pd.concat(manifests.values(), ignore_index=True).drop_duplicates("id")
    where = {f"{k}s": union[f"image_{k}"].fillna(-1).to_numpy(np.int64) for k in ("offset", "size")
             if f"image_{k}" in union}
    ext = extract_features(union["id"].to_numpy(np.int64), union["image_container"].to_numpy(),
                           union["image_member"].to_numpy(), ImageStore(Path(data_dir)).open, bb, cache,
                           device=device, precision=precision, **extract_kwargs, **(where if len(where) == 2 else {}))
    return {"cache": cache, "weights": bb.weights_key, "precision": precision, "index": ext.index,
            "encoded_ids": ext.encoded_ids, "summary": ext.summary()}


def run_features(
    data_dir: Path, ingest_dir: Path, out_root: Path, backbone: str = "fixed:pixelstats",
    pretrained: str | None = None, batch_size: int = 256, num_workers: int = 2, device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None, *, precision: str = "fp32",
    shard_size: int = 8192, retry_failed: bool = False, max_bad_fraction: float = 0.05, fast_decode: bool = True,
    decoder: str = "pil",
) -> dict:
    """Frozen backbone features of every manifest image, in one incremental cache per backbone.

    Only images the cache lacks are encoded (both splits in one pass). ``precomputed:<name>``
    reads ``ingest_dir/features/<name>`` (written by the WebDataset ingest) and only checks that
    every manifest id is there. Returns backbone, dim, weights (content key), cache, ``dirs``
    {split: view folder} for the later stages, ``digests`` {split: sha256 of backbone, weights,
    precision and the split's ids}, ``fast_decode`` (whether images were decoded at reduced scale:
    the export records it, so serving decodes alike; False for ``precomputed:`` and for the "device"
    decoder, which decodes at full size: serving's PIL full decode is within 1/255 a pixel of it on the
    CPU), ``decoder``, and per split n, encoded, cached, failures, seconds, images_per_s.
    ``fast_decode``: JPEGs decoded at reduced scale (hierloc.features.decode; its own cache key);
    False: full decode. ``decoder``: "pil", or "device" (JPEGs decoded by decode_jpeg on ``device``,
    hierloc.features.device_decode; its own cache key). Unreadable images get NaN features (left out
    later); FeatureFailureError when a split's share of them is above ``max_bad_fraction`` (a wrong
    image root, a broken backbone).
    """
    kind, name = parse_spec(backbone)
    manifests = _image_columns(ingest_dir)
    if kind == "precomputed":
        got = _precomputed(backbone, name, ingest_dir)
    else:
        got = _encode(backbone, pretrained, data_dir, manifests, out_root, device, precision, batch_size=batch_size,
                      shard_size=shard_size, num_workers=num_workers, retry_failed=retry_failed, progress=progress,
                      fast_decode=fast_decode, decoder=decoder)
    cache, weights, precision, index = got["cache"], got["weights"], got["precision"], got["index"]
    decoded = kind != "precomputed"  # images decoded here (precomputed features: none)
    out: dict = {"backbone": backbone, "dim": index.dim, "weights": weights, "precision": precision,
                 "fast_decode": decoded and bool(fast_decode) and decoder == "pil",
                 "decoder": decoder if decoded else "pil", "cache": str(cache), "dirs": {}, "digests": {}}
    for split, m in manifests.items():
        ids = m["id"].to_numpy(np.int64)
        missing = index.missing(ids)
        if len(missing):  # precomputed features that the ingest did not write
            raise ValueError(f"backbone {backbone}: {len(missing)} of {len(ids)} {split} manifest ids have no "
                             f"features in {cache} (e.g. id {int(missing[0])}); re-run the ingest that writes them")
        digest = features_digest(backbone, weights, precision, ids)
        view = Path(out_root) / f"{_slug(backbone)}-{digest[:16]}" / split
        doc = write_view(view, cache, ids, index.failures, {"split": split, "backbone": backbone, "weights": weights,
                                                            "precision": precision, "digest": digest, "dim": index.dim})
        bad = ids[index.failed(ids)]
        check_feature_failures(split, len(ids), [(int(i), index.failures[int(i)]) for i in bad[:5]], len(bad),
                               max_bad_fraction, str(data_dir), log)
        n_new = int(np.isin(ids, got["encoded_ids"]).sum())
        out["dirs"][split], out["digests"][split] = str(view), digest
        out[split] = {"n": int(len(ids)), "encoded": n_new, "cached": int(len(ids)) - n_new, "failures": doc["failures"],
                      "seconds": got["summary"]["seconds"], "images_per_s": got["summary"]["images_per_s"]}
    return out
