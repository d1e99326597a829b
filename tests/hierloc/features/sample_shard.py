"""What the feature tests on the real OSV-5M sample photos share: the photos, a tiny 224 px open_clip ViT
(open_clip's own preprocess: Resize(224, bicubic), CenterCrop(224), ToTensor, Normalize, as ViT-B-32's),
a zip shard of given members, and the features the feature stage computes for them."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from geodata.ingest.image_store import ImageStore
from hierloc.features.extract import extract_features
from hierloc.features.views import load_features

TINY_CLIP_224 = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                                                 "patch_size": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
SHARD = "images/train/00.zip"


def write_clip_spec(folder: Path) -> str:
    """The backbone spec of TINY_CLIP_224, its config written into ``folder``."""
    path = Path(folder) / "hierloc-test-tiny-vit-224.json"
    path.write_text(json.dumps(TINY_CLIP_224))
    return f"open_clip:{path}"


def sample_photo_bytes() -> dict[str, bytes]:
    """{file name: JPEG bytes} of the sample photos (at least 20)."""
    images = Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images"  # set by tests/conftest.py at configure time
    found = {p.name: p.read_bytes() for p in sorted(images.glob("*.jpg"))}
    assert len(found) >= 20
    return found


def zip_shard(root: Path, members: dict[str, bytes]) -> tuple[np.ndarray, list[str], list[str]]:
    """The members in root/SHARD; (ids 1.., containers, members)."""
    path = Path(root) / SHARD
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return np.arange(1, len(members) + 1, dtype=np.int64), [SHARD] * len(members), list(members)


def extract_shard(root: Path, members: dict[str, bytes], backbone, cache: str, **kw) -> np.ndarray:
    """The members zipped (``zip_shard``) and encoded by extract_features into root/cache (batches of 8,
    no workers unless ``kw`` says otherwise): their features, in the members' order."""
    ids, containers, names = zip_shard(root, members)
    kw = {"batch_size": 8, "num_workers": 0, **kw}
    extract_features(ids, containers, names, ImageStore(root).open, backbone, Path(root) / cache, **kw)
    return load_features(Path(root) / cache, ids)
