"""Data-parallel training: shards, torchrun's environment, and a real 2-process gloo run on the CPU."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hierloc.train.distributed import DistContext, env_ranks, shard
from hierloc.model.model import ModelConfig
from hierloc.train.data import load_arrays, save_arrays
from hierloc.train.loop import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shards_are_disjoint_and_cover_the_batch():
    rows = torch.randperm(103)
    for world in (1, 2, 3, 8):
        parts = [shard(rows, DistContext(rank=r, world_size=world)) for r in range(world)]
        assert sorted(torch.cat(parts).tolist()) == sorted(rows.tolist())
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_env_ranks():
    assert env_ranks({}) == (0, 1, 0)
    assert env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="outside"):
        env_ranks({"RANK": "4", "WORLD_SIZE": "4"})


def test_arrays_folder_round_trip(tiny, tmp_path):
    data, ents = tiny
    save_arrays(tmp_path, data, ents)
    d2, e2 = load_arrays(tmp_path)
    assert np.array_equal(d2.features, data.features) and np.array_equal(d2.targets, data.targets)
    assert np.array_equal(e2.img_feat, ents.img_feat) and e2.level_sizes == ents.level_sizes
    (tmp_path / "entities.npz").unlink()
    with pytest.raises(FileNotFoundError, match="entities.npz is missing"):
        load_arrays(tmp_path)


# The real entry point (hierloc.train.loop.main) under torchrun, with a spy on the shards each rank takes.
SPY = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import hierloc.train.loop as T
    seen, real = [], T.shard
    def spy(rows, ctx):
        out = real(rows, ctx)
        seen.append(out.numpy().copy())
        return out
    T.shard = spy
    T.main(sys.argv[1:])
    np.save(os.path.join(sys.argv[sys.argv.index("--out") + 1], f"rows_rank{os.environ['RANK']}.npy"),
            np.array(seen, dtype=object), allow_pickle=True)
    """
)


@pytest.mark.slow  # ~17 s on the shared 2-core machine: three Python processes start torch
def test_two_gloo_processes_match_one_process(tiny, tmp_path):
    data, ents = tiny
    save_arrays(tmp_path / "data", data, ents)
    mcfg = ModelConfig(dim=8, hidden=32, dropout=0.0)  # dropout masks differ per rank: off for equality
    cfg = TrainConfig(epochs=2, batch_size=64, warmup_steps=5, log_every=5, device="cpu")
    (tmp_path / "spy.py").write_text(SPY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "spy.py"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "two"),
         "--model-config", json.dumps(mcfg.to_dict()), "--train-config", json.dumps(cfg.to_dict())],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"model_path"') == 1  # only rank 0 reports (and writes)

    # Both ranks took disjoint halves of every global batch, which together are the batch.
    r0, r1 = (np.load(tmp_path / "two" / f"rows_rank{r}.npy", allow_pickle=True) for r in (0, 1))
    assert len(r0) == len(r1) == 20 and [len(r) for r in r0] == [32] * 9 + [12] + [32] * 9 + [12]
    for epoch in range(2):
        perm = torch.randperm(600, generator=torch.Generator().manual_seed(epoch)).numpy()
        for b in range(10):
            step = epoch * 10 + b
            assert not set(r0[step]) & set(r1[step])
            assert sorted(np.r_[r0[step], r1[step]]) == sorted(perm[b * 64 : (b + 1) * 64])

    # One process, same global batch: the same training up to float summation order
    # (each rank sums its half of the batch, then the halves are averaged).
    one = train(data, ents, mcfg, cfg, tmp_path / "one")
    a = torch.load(one.model_path, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["epoch_loss"] == pytest.approx(one.final["epoch_loss"], rel=1e-4)
