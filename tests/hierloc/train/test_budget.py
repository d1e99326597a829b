"""A step budget (train.max_steps / train.max_samples): where the run stops, its schedule, resume."""

import numpy as np
import pytest
import torch

from hierloc.digest import digest_of
from hierloc.model.model import ModelConfig
from hierloc.train.loop import TrainConfig, train

FAST = dict(epochs=4, batch_size=64, warmup_steps=2, log_every=1)  # tiny: 600 rows, 10 steps per epoch
MCFG = ModelConfig(dim=8, hidden=32)

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_budget_steps_is_the_smaller_of_steps_and_ceil_samples():
    assert TrainConfig().budget_steps() is None
    assert TrainConfig(batch_size=64, max_steps=7).budget_steps() == 7
    assert TrainConfig(batch_size=64, max_samples=65).budget_steps() == 2  # ceil(65 / 64)
    assert TrainConfig(batch_size=64, max_samples=640, max_steps=7).budget_steps() == 7
    assert TrainConfig(batch_size=64, max_samples=128, max_steps=7).budget_steps() == 2
    for bad in ({"max_steps": 0}, {"max_samples": 0}, {"max_steps": -1}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_an_unset_budget_keeps_the_config_digest_and_a_changed_one_changes_it():
    plain = TrainConfig()
    assert "max_steps" not in plain.to_dict() and "max_samples" not in plain.to_dict()  # old run folders resume
    digests = {digest_of(TrainConfig(**b).to_dict()) for b in ({}, {"max_steps": 5}, {"max_steps": 6},
                                                                 {"max_samples": 5})}
    assert len(digests) == 4
    assert TrainConfig(**TrainConfig(max_steps=5).to_dict()) == TrainConfig(max_steps=5)  # round trip
    # compile (issue 15) is left out at its default too: runs from before it resume
    assert "compile" not in plain.to_dict() and TrainConfig(compile="off").to_dict()["compile"] == "off"


def test_a_budget_stops_mid_epoch_decays_the_lr_to_zero_and_writes_model_and_checkpoint(tiny, tmp_path):
    data, ents = tiny
    logged = []
    res = train(data, ents, MCFG, TrainConfig(**FAST, max_steps=13), tmp_path,
                log_fn=lambda m, s: logged.append((s, m)))
    assert res.budgeted and res.steps == res.steps_run == res.stop_step == 13 and res.epochs_run == 2
    lrs = [m["lr"] for _, m in logged if "lr" in m]
    assert len(lrs) == 13 and lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # cosine over the 13 budgeted steps, not 40
    epochs = [m for _, m in logged if "epoch_loss" in m]
    assert [m["epoch"] for m in epochs] == [1, pytest.approx(1.3)]  # the stop ends epoch 2 at 3/10
    assert res.final and np.isfinite(res.final["epoch_loss"])
    assert res.model_path.exists()
    ck = torch.load(res.checkpoint, weights_only=True)
    assert (ck["epoch"], ck["batch"], ck["step"]) == (1, 3, 13)
    again = train(data, ents, MCFG, TrainConfig(**FAST, max_steps=13), tmp_path)  # spent: nothing to do
    assert again.steps == 13 and again.steps_run == 0 and again.epochs_run == 0


def test_max_samples_rounds_up_to_whole_steps_and_a_large_budget_ends_with_the_epochs(tiny, tmp_path):
    data, ents = tiny
    res = train(data, ents, MCFG, TrainConfig(**FAST, max_samples=65), tmp_path / "a")
    assert res.budgeted and res.steps == 2
    # device="cpu" for the two runs compared bit for bit below (the CPU path's promise; "auto" would
    # pick CUDA where present, whose kernels may reduce in another order from run to run)
    res = train(data, ents, MCFG, TrainConfig(**{**FAST, "epochs": 1}, max_steps=1000, device="cpu"), tmp_path / "b")
    assert res.budgeted and res.steps == res.stop_step == 10  # one epoch of 10 steps comes first
    plain = train(data, ents, MCFG, TrainConfig(**{**FAST, "epochs": 1}, device="cpu"), tmp_path / "c")
    assert not plain.budgeted and plain.steps == 10
    # a budget past the epochs changes nothing in the schedule: the same weights as no budget
    a, c = _weights(res.model_path), _weights(plain.model_path)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_changed_budget_does_not_resume_the_other_budgets_checkpoint(tiny, tmp_path):
    data, ents = tiny
    first = train(data, ents, MCFG, TrainConfig(**FAST, max_steps=4), tmp_path)
    assert first.steps == 4
    more = train(data, ents, MCFG, TrainConfig(**FAST, max_steps=6), tmp_path)  # another digest: from scratch
    assert more.steps == more.steps_run == 6


@pytest.mark.parametrize("k", [1, 2])
def test_a_killed_budgeted_run_resumes_to_the_same_step_and_weights(tiny, tmp_path, k):
    data, ents = tiny
    # device="cpu": the resumed and the uninterrupted run are compared bit for bit (the CPU path's
    # promise; "auto" would pick CUDA where present, whose kernels may reduce in another order)
    cfg = TrainConfig(**FAST, max_steps=17, checkpoint_every_steps=4, entity_refresh_every=k, device="cpu")
    full = train(data, ents, MCFG, cfg, tmp_path / "a")

    def crash(m, step):
        if step == 14 and "train_loss" in m:
            raise KeyboardInterrupt  # after the step-12 checkpoint, before the budget's end
    with pytest.raises(KeyboardInterrupt):
        train(data, ents, MCFG, cfg, tmp_path / "b", log_fn=crash)
    assert not (tmp_path / "b" / "model.pt").exists()
    resumed = train(data, ents, MCFG, cfg, tmp_path / "b")
    assert resumed.steps == full.steps == 17 and resumed.steps_run == 5
    assert resumed.final == pytest.approx(full.final, rel=1e-6)
    a, b = _weights(full.model_path), _weights(resumed.model_path)
    for name in a:
        assert torch.equal(a[name], b[name]), name
