"""Beam search: exact against brute force, consistent paths, equal to flat when k covers all."""

import numpy as np
import pytest
import torch

from hierloc.infer.beam import beam_search, beam_search_chunks
from hierloc.model.model import ModelConfig
from hierloc.model.io import build_model


@pytest.fixture(scope="module")
def model(tiny):
    data, ents = tiny
    torch.manual_seed(0)
    return build_model(ModelConfig(dim=8, hidden=32), data, ents).eval()


def _flat_best_city(model, feats):
    with torch.no_grad():
        z = model.encode_images(torch.as_tensor(feats))
        d = model.sq_dist(z, model.encode_entities()[model.level_slice(3)])
    return d.argmin(1).numpy() + int(model.level_offsets[3])


def test_wide_beam_equals_flat_search(model, tiny):
    data, _ = tiny
    res = beam_search(model, data.features[:200], k=1000, score="last")
    assert np.array_equal(res.picks[:, 3], _flat_best_city(model, data.features[:200]))


def test_paths_are_consistent_and_scores_sorted(model, tiny):
    data, _ = tiny
    res = beam_search(model, data.features[:100], k=2, score="sum", batch_size=7)
    parent = model.parent_index.numpy()
    for lvl in (3, 2, 1):
        assert np.array_equal(parent[res.picks[:, lvl]], res.picks[:, lvl - 1])
    for lvl in range(4):
        sl = model.level_slice(lvl)
        assert ((res.picks[:, lvl] >= sl.start) & (res.picks[:, lvl] < sl.stop)).all()
    assert np.all(np.diff(res.top_scores, axis=1) >= 0)


def test_narrow_beam_only_visits_children_of_kept_countries(model, tiny):
    data, _ = tiny
    feats = data.features[:50]
    with torch.no_grad():
        z = model.encode_images(torch.as_tensor(feats))
        best_country = model.sq_dist(z, model.encode_entities()[model.level_slice(0)]).argmin(1).numpy()
    res = beam_search(model, feats, k=1)
    assert np.array_equal(res.picks[:, 0], best_country)


def test_empty_input(model):
    res = beam_search(model, np.zeros((0, 16), dtype=np.float32), k=3)
    assert res.picks.shape == (0, 4)


def test_the_search_block_by_block_equals_one_search(model, tiny, tmp_path):
    """What the evaluate stage runs on a test split left on disk (beam_search_chunks)."""
    from hierloc.features.cache import write_shard
    from hierloc.features.views import open_features

    data, _ = tiny
    feats = data.features[:300]
    ids = np.arange(300)
    write_shard(tmp_path / "shard-00000.npz", ids[:170], feats[:170], [""] * 170)
    write_shard(tmp_path / "shard-00001.npz", ids[170:], feats[170:], [""] * 130)
    one = beam_search(model, feats, k=5, tau=0.7)
    for source in (feats, open_features(tmp_path, ids)):
        got = beam_search_chunks(model, source, chunk_rows=64, k=5, tau=0.7)
        for f in ("picks", "pick_score", "pick_prob", "top_rows", "top_scores", "top_paths", "top_probs", "n_scored"):
            np.testing.assert_allclose(getattr(got, f), getattr(one, f), rtol=1e-5, atol=1e-6, err_msg=f)
    empty = beam_search_chunks(model, feats[:0], k=5)
    assert empty.picks.shape == (0, 4) and empty.top_paths.shape[0] == 0
