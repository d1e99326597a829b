"""A small synthetic hierarchy with clustered features, shared by the model tests."""

import numpy as np
import pytest
import torch

from hierloc.train.data import EntityData, TrainData, entity_mean_features

LEVEL_SIZES = [3, 6, 12, 24]  # fan-out 2 below the countries


def make_tiny(seed: int = 0, n: int = 600, d_img: int = 16):
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0, *LEVEL_SIZES])
    parent = np.full(offsets[-1], -1, dtype=np.int64)
    for lvl in range(1, 4):
        parent[offsets[lvl] : offsets[lvl + 1]] = offsets[lvl - 1] + np.arange(LEVEL_SIZES[lvl]) // 2
    city = rng.integers(0, LEVEL_SIZES[3], n)
    targets = np.zeros((n, 4), dtype=np.int64)
    targets[:, 3] = city
    for lvl in (2, 1, 0):
        targets[:, lvl] = parent[offsets[lvl + 1] + targets[:, lvl + 1]] - offsets[lvl]
    city_latlon = np.c_[rng.uniform(-60, 60, LEVEL_SIZES[3]), rng.uniform(-180, 180, LEVEL_SIZES[3])]
    latlon = city_latlon[city].astype(np.float32)
    feats = (rng.normal(size=(LEVEL_SIZES[3], d_img))[city] + 0.3 * rng.normal(size=(n, d_img))).astype(np.float32)
    ent_latlon = np.zeros((offsets[-1], 2), dtype=np.float32)
    ent_latlon[offsets[3] :] = city_latlon
    for lvl in (2, 1, 0):  # parents at the mean of their children (fine for a test)
        for j in range(LEVEL_SIZES[lvl]):
            kids = np.where(parent == offsets[lvl] + j)[0]
            ent_latlon[offsets[lvl] + j] = ent_latlon[kids].mean(0)
    data = TrainData(feats, targets, latlon)
    ents = EntityData(entity_mean_features(feats, targets, LEVEL_SIZES), ent_latlon, LEVEL_SIZES, parent)
    return data, ents


@pytest.fixture(scope="session")
def tiny():
    return make_tiny()


@pytest.fixture
def one_thread():
    """Tiny problems: on a busy machine two OpenMP threads mostly wait for each other (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
