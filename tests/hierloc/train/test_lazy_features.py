"""Training from features left on disk (a FeatureRows over memory-mapped shards) is training from
the in-memory array: same entity means, same normalisation, same losses and weights."""

from __future__ import annotations

import numpy as np
import torch

from hierloc.features.cache import write_shard
from hierloc.features.views import open_features
from hierloc.model.model import ModelConfig
from hierloc.train.data import EntityData, TrainData, entity_mean_features, feature_moments
from hierloc.train.loop import TrainConfig, train


def _old_entity_mean_features(features, targets, level_sizes):
    """The formula before the streaming pass (56af654): the whole matrix in float64."""
    feats = torch.as_tensor(features, dtype=torch.float64)
    global_mean = feats.mean(0)
    out = []
    for lvl, n in enumerate(level_sizes):
        idx = torch.from_numpy(np.array(targets[:, lvl], dtype=np.int64))
        ok = idx >= 0
        sums = torch.zeros(n, feats.shape[1], dtype=torch.float64).index_add_(0, idx[ok], feats[ok])
        counts = torch.bincount(idx[ok], minlength=n).double()[:, None]
        out.append(torch.where(counts > 0, sums / counts.clamp_min(1), global_mean))
    return torch.cat(out).float().numpy()


def _to_cache(tmp_path, feats, rng, n_shards=3, dtype=np.float16):
    """``feats`` written as ``n_shards`` shards in a shuffled order; returns (cache, ids of the rows)."""
    ids = 10_000 + np.arange(len(feats))
    order = rng.permutation(len(feats))
    cache = tmp_path / "cache"
    cache.mkdir()
    for k, part in enumerate(np.array_split(order, n_shards)):
        write_shard(cache / f"shard-{k:05d}.npz", ids[part], feats[part].astype(dtype), [""] * len(part))
    return cache, ids


def test_streamed_entity_means_equal_the_whole_matrix_formula(tmp_path):
    rng = np.random.default_rng(0)
    n, sizes = 1000, [3, 7, 40]
    feats = (rng.normal(size=(n, 5)) * 3 + 1).astype(np.float16).astype(np.float32)
    targets = np.stack([rng.integers(-1, s, n) for s in sizes], 1)
    targets[:, 2] = np.where(targets[:, 2] == 39, 38, targets[:, 2])  # entity 39: no images, the global mean
    old = _old_entity_mean_features(feats, targets, sizes)
    new = entity_mean_features(feats, targets, sizes, chunk_rows=64)
    np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new[-1], feats.astype(np.float64).mean(0), rtol=1e-6)
    cache, ids = _to_cache(tmp_path, feats, rng)
    rows = open_features(cache, ids)
    np.testing.assert_array_equal(entity_mean_features(rows, targets, sizes, chunk_rows=64), new)
    mean, std = feature_moments(rows, chunk_rows=64)
    ref = torch.as_tensor(feats, dtype=torch.float64)
    np.testing.assert_allclose(mean, ref.mean(0).float(), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(0).float(), rtol=1e-6)


def test_training_from_the_map_equals_training_from_the_array(tiny, tmp_path, one_thread):
    data, ents = tiny
    rng = np.random.default_rng(1)
    feats = data.features.astype(np.float16).astype(np.float32)  # what float16 shards hold, widened
    cache, ids = _to_cache(tmp_path, feats, rng)
    rows = open_features(cache, ids)
    mcfg = ModelConfig(dim=8, hidden=32, dropout=0.1)
    cfg = TrainConfig(epochs=1, batch_size=64, warmup_steps=2, log_every=2, device="cpu", seed=3)
    results, models = {}, {}
    for name, f in (("array", feats), ("map", rows)):
        img = entity_mean_features(f, data.targets, ents.level_sizes)
        e = EntityData(img, ents.latlon_deg, ents.level_sizes, ents.parent_index)
        logged = []
        res = train(TrainData(f, data.targets, data.latlon_deg), e, mcfg, cfg, tmp_path / name,
                    log_fn=lambda m, s, out=logged: out.append((s, m.get("train_loss"))))
        results[name] = (res.steps, res.final, [x for x in logged if x[1] is not None])
        models[name] = torch.load(res.model_path, weights_only=True)
    assert results["map"] == results["array"] and results["map"][0] == 10
    sd_a, sd_m = models["array"]["state_dict"], models["map"]["state_dict"]
    assert sd_a.keys() == sd_m.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_m[k]), k


def test_a_killed_run_on_the_map_resumes_after_the_cache_grew(tiny, tmp_path, one_thread):
    """Crash mid-epoch, the features stage then appends a shard (new ids, and a retry of a cached
    id: the newest shard wins), the run resumes from a fresh map: the same model as one
    uninterrupted run on the in-memory array."""
    data, ents = tiny
    rng = np.random.default_rng(2)
    feats = data.features.astype(np.float16).astype(np.float32)
    cache, ids = _to_cache(tmp_path, feats, rng)
    mcfg = ModelConfig(dim=8, hidden=32)
    cfg = TrainConfig(epochs=2, batch_size=64, warmup_steps=2, log_every=1, device="cpu", checkpoint_every_steps=4)
    full = train(TrainData(feats, data.targets, data.latlon_deg), ents, mcfg, cfg, tmp_path / "a")

    def crash(m, step):
        if step == 15 and "train_loss" in m:
            raise KeyboardInterrupt
    lazy = TrainData(open_features(cache, ids), data.targets, data.latlon_deg)
    try:
        train(lazy, ents, mcfg, cfg, tmp_path / "b", log_fn=crash)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the run was meant to stop at step 15")
    write_shard(cache / "shard-00003.npz", np.r_[ids[:1], 99_000 + np.arange(5)],
                np.r_[feats[:1], rng.normal(size=(5, feats.shape[1]))].astype(np.float16), [""] * 6)
    resumed = train(TrainData(open_features(cache, ids), data.targets, data.latlon_deg), ents, mcfg, cfg,
                    tmp_path / "b")
    assert resumed.steps_run == 8 and resumed.steps == full.steps == 20
    assert resumed.final == full.final
    a = torch.load(full.model_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
