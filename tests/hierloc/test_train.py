"""Training: it learns, the geometry switch works, a killed run resumes to the same end."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hierloc.inference import beam_search
from hierloc.model import ModelConfig
from hierloc.train import TrainConfig, load_model, train

FAST = dict(epochs=4, batch_size=64, warmup_steps=5, log_every=5)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_learns_the_hierarchy(tiny, tmp_path, geometry):
    data, ents = tiny
    logged = []
    res = train(data, ents, ModelConfig(dim=8, hidden=32, geometry=geometry),
                TrainConfig(**{**FAST, "epochs": 10}), tmp_path,
                log_fn=lambda m, s: logged.append((s, m)))
    model = load_model(res.model_path)
    assert model.cfg.geometry == geometry
    picks = beam_search(model, data.features, k=3).picks
    country_acc = (picks[:, 0] - 0 == data.targets[:, 0]).mean()
    majority = np.bincount(data.targets[:, 0]).max() / len(data.targets)
    assert country_acc > majority + 0.2, (country_acc, majority)
    assert any("train_loss" in m for _, m in logged) and any("epoch_loss" in m for _, m in logged)


def test_hyperbolic_and_euclidean_points_differ(tiny):
    data, ents = tiny
    from hierloc.train import build_model

    h = build_model(ModelConfig(dim=8, hidden=32), data, ents).encode_entities()
    e = build_model(ModelConfig(dim=8, hidden=32, geometry="euclidean"), data, ents).encode_entities()
    assert h.shape[1] == 9 and e.shape[1] == 8


def test_checkpoint_of_another_configuration_is_ignored(tiny, tmp_path):
    data, ents = tiny
    mcfg, cfg = ModelConfig(dim=8, hidden=32), TrainConfig(**FAST)
    first = train(data, ents, mcfg, cfg.model_copy(update={"epochs": 1}), tmp_path)
    assert first.epochs_run == 1
    again = train(data, ents, mcfg, cfg, tmp_path)  # 4 epochs: another digest, starts afresh
    assert again.epochs_run == 4
    same = train(data, ents, mcfg, cfg, tmp_path)  # finished run with the same config: nothing left
    assert same.epochs_run == 0


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_identical_model(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, os.environ["CONFTEST_DIR"])
        from conftest import make_tiny
        from hierloc.model import ModelConfig
        from hierloc.train import TrainConfig, train
        data, ents = make_tiny()
        kill_after = int(sys.argv[2])
        def log_fn(m, step):
            if kill_after and "epoch" in m and m["epoch"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        train(data, ents, ModelConfig(dim=8, hidden=32), TrainConfig(epochs=4, batch_size=64, warmup_steps=5, log_every=5),
              Path(sys.argv[1]), log_fn=log_fn)
        """
    )
    env = {**os.environ, "CONFTEST_DIR": os.path.dirname(__file__)}
    run = lambda out, kill: subprocess.run([sys.executable, "-c", script, str(out), str(kill)], env=env)
    assert run(tmp_path / "a", 0).returncode == 0
    # Killed by SIGKILL right after epoch 2 was logged (its checkpoint is written after the log):
    killed = run(tmp_path / "b", 2)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "model.pt").exists()
    assert run(tmp_path / "b", 0).returncode == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=False)["state_dict"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
