"""Fixtures of the feature tests on the real sample photos (tests/hierloc/features/sample_shard.py)."""

import pytest

from tests.hierloc.features.sample_shard import sample_photo_bytes, write_clip_spec


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory) -> str:
    """A random-init open_clip ViT on 224 px inputs (sample_shard.TINY_CLIP_224)."""
    return write_clip_spec(tmp_path_factory.mktemp("clipcfg"))


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """{file name: JPEG bytes} of the OSV-5M sample photos."""
    return sample_photo_bytes()
