"""A training step reads nothing back from the device between logging points (issue 15).

Counted on the CPU with hierloc.train.host_syncs.HostSyncs, which follows the tensors that live on
the GPU when training there and records every .item() / float() / bool() / .tolist() / .cpu() and
data-dependent shape on them. The same checks on a GPU: tests/hierloc/test_cuda.py.
"""

from pathlib import Path

import pytest
import torch

from hierloc.model.model import ModelConfig
from hierloc.train.distributed import setup
from hierloc.train.host_syncs import step_syncs
from hierloc.train.loop import TrainConfig, _Loop

pytestmark = pytest.mark.usefixtures("one_thread")


def _loop(tiny, tmp_path: Path, **cfg) -> _Loop:
    data, ents = tiny
    ctx, device = setup("cpu")
    tcfg = TrainConfig(**{"epochs": 1, "batch_size": 32, "warmup_steps": 2, "device": "cpu", **cfg})
    return _Loop(data, ents, ModelConfig(dim=8, hidden=32), tcfg, tmp_path / "checkpoint.pt", lambda m, s: None,
                 None, None, ctx, device)


def _count(loop: _Loop, steps: range) -> list:
    perm = torch.randperm(loop.n, generator=torch.Generator().manual_seed(0))
    bs = loop.cfg.batch_size
    for b in range(steps.start):  # optimiser state exists from here on
        loop._step(perm[b * bs : (b + 1) * bs], last_batch=False)
    return step_syncs(loop, [perm[b * bs : (b + 1) * bs] for b in steps])


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("streamed", [False, True])
def test_no_host_sync_between_logging_points(tiny, tmp_path, k, streamed):
    """Steps 2..13 with log_every 16: the materialised and the streamed loss, the entity table every
    step (k=1) or per cycle (k=4, the cycle's closing step included), geoopt's stabilising step (every
    10), activation-checkpointed entity chunks: not one host sync."""
    loop = _loop(tiny, tmp_path, log_every=16, entity_refresh_every=k)
    if streamed:
        loop.loss_fn.plain_max_elems = 0  # every level streamed over chunks of entities
        loop.model.entity_chunk = 16  # f_e in checkpointed chunks
    syncs = _count(loop, range(2, 14))
    assert syncs == [], "\n".join(f"{s.what} at {s.where}" for s in syncs)


def test_a_logging_step_reads_the_device_and_the_counter_sees_it(tiny, tmp_path):
    """The counter is not blind: a logging step reads the loss, the finite flags and the scalars."""
    loop = _loop(tiny, tmp_path, log_every=4)
    syncs = _count(loop, range(2, 5))  # step 4 logs
    assert syncs, "a logging step must show its host reads"
    assert any("finite_checks.py" in s.where for s in syncs)
    assert all("loop.py" in s.where or "finite_checks.py" in s.where for s in syncs), syncs


def test_nan_gradient_is_named_at_the_next_logging_point(tiny, tmp_path):
    """A NaN gradient of one parameter (the loss finite) at step 5 is caught at the logging point of
    step 8, naming step 5 and that parameter; no checkpoint was written."""
    loop = _loop(tiny, tmp_path, log_every=8)
    hit = {"n": 0}

    def poison(g):
        hit["n"] += 1
        return g * float("nan") if hit["n"] == 6 else g  # the 6th backward: step 5

    loop.model.img_proj.weight.register_hook(poison)
    perm = torch.randperm(loop.n, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 5 .*img_proj\.weight: gradient norm nan"):
        for b in range(8):
            loop._step(perm[b * 32 : (b + 1) * 32], last_batch=False)
    assert loop.step == 8  # it ran on to the logging point, then stopped
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.slow
def test_compiled_loss_trains_like_the_eager_one(tiny, tmp_path):
    """TrainConfig.compile='on' (the CUDA default) runs the materialised loss through torch.compile:
    the same losses as eager to float32 rounding, step after step (here on the CPU's inductor)."""
    from hierloc.model import loss_terms

    losses = {}
    for mode in ("off", "on"):
        loop = _loop(tiny, tmp_path / mode, compile=mode)
        perm = torch.randperm(loop.n, generator=torch.Generator().manual_seed(0))
        got = []
        for b in range(4):
            loop._step(perm[b * 32 : (b + 1) * 32], last_batch=False)
            got.append(loop.sums[0].item())
        losses[mode] = got
    assert "fn" in loss_terms._COMPILED and not loss_terms._COMPILED.get("broken")
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 4])
def test_no_stream_sync_between_logging_points_on_cuda(tiny, tmp_path, k):
    """On a GPU, torch itself flags every synchronising call (set_sync_debug_mode): steps between
    logging points make none; a logging step does (the counter is not blind)."""
    data, ents = tiny
    ctx, device = setup("cuda")
    cfg = TrainConfig(epochs=1, batch_size=32, warmup_steps=2, device="cuda", log_every=16, entity_refresh_every=k,
                      compile="off")
    loop = _Loop(data, ents, ModelConfig(dim=8, hidden=32), cfg, tmp_path / "checkpoint.pt", lambda m, s: None,
                 None, None, ctx, device)
    perm = torch.randperm(loop.n, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        loop._step(perm[b * 32 : (b + 1) * 32], last_batch=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in range(2, 14):
            loop._step(perm[b * 32 : (b + 1) * 32], last_batch=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            for b in range(14, 16):  # step 16 logs
                loop._step(perm[b * 32 : (b + 1) * 32], last_batch=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
