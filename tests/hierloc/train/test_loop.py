"""Training: it learns, the geometry switch works, a killed run resumes to the same end."""

import io
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import geoopt
import numpy as np
import pytest
import torch

from hierloc.infer.beam import beam_search
from hierloc.model.model import ModelConfig
from hierloc.model.io import load_model
from hierloc.train.loop import TrainConfig, train

FAST = dict(epochs=4, batch_size=64, warmup_steps=5, log_every=5)


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_each_epoch_reports_steps_samples_per_s_and_eta_as_it_goes(tiny, tmp_path, monkeypatch, caplog):
    """Off a terminal (a Prefect run, a log file) the epoch logs its progress: steps done/total,
    steps/s, samples/s and the epoch's ETA, at most every HIERLOC_PROGRESS_EVERY_S seconds
    (0 here: every step; the default is one line per ~10 s); then its closing line."""
    data, ents = tiny
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, whatever runs pytest
    monkeypatch.setenv("HIERLOC_PROGRESS_EVERY_S", "0")
    caplog.set_level(logging.INFO, logger="hierloc.train.loop")
    train(data, ents, ModelConfig(dim=8, hidden=32), TrainConfig(**{**FAST, "epochs": 2}), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "hierloc.train.loop"]
    steps = -(-len(data.features) // FAST["batch_size"])  # 10
    for epoch in (1, 2):
        within = [x for x in lines if x.startswith(f"epoch {epoch}/2: ") and "ETA" in x]
        assert len(within) == steps, lines
        assert re.fullmatch(rf"epoch {epoch}/2: 4/{steps} steps \(40%\), [\d.,]+ steps/s, [\d.,]+ samples/s, "
                            r"ETA \d+ (s|min \d\d s)", within[3]), within[3]
        assert re.fullmatch(rf"epoch {epoch}/2: {steps}/{steps} steps in \d+ s \([\d.,]+ steps/s, [\d.,]+ samples/s\)",
                            lines[lines.index(within[-1]) + 1])
    assert "steps/s" not in sys.stderr.getvalue()  # lines, no bar


def test_hyperbolic_and_euclidean_points_differ(tiny):
    data, ents = tiny
    from hierloc.model.io import build_model

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
        from hierloc.model.model import ModelConfig
        from hierloc.train.loop import TrainConfig, train
        data, ents = make_tiny()
        kill_after = int(sys.argv[2])
        def log_fn(m, step):
            if kill_after and "epoch" in m and m["epoch"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        # device="cpu": bit-identity after a resume is the CPU path's promise (on CUDA, "auto"'s pick,
        # kernels may reduce in another order from run to run)
        train(data, ents, ModelConfig(dim=8, hidden=32),
              TrainConfig(epochs=4, batch_size=64, warmup_steps=5, log_every=5, device="cpu"),
              Path(sys.argv[1]), log_fn=log_fn)
        """
    )
    env = {**os.environ, "CONFTEST_DIR": os.path.dirname(os.path.dirname(__file__))}
    run = lambda out, kill: subprocess.run([sys.executable, "-c", script, str(out), str(kill)], env=env)
    assert run(tmp_path / "a", 0).returncode == 0
    # Killed by SIGKILL right after epoch 2 was logged (its checkpoint is written after the log):
    killed = run(tmp_path / "b", 2)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "model.pt").exists()
    assert run(tmp_path / "b", 0).returncode == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- optimisers, schedule ----------------------------------------------------------------
def test_param_groups_decay_only_weight_matrices(tiny):
    from hierloc.model.loss import GeoWeightedInfoNCE
    from hierloc.model.io import build_model
    from hierloc.train.optim import param_groups

    data, ents = tiny
    for mcfg, anchors_kind in ((ModelConfig(dim=8, hidden=32), "manifold"),
                               (ModelConfig(dim=8, hidden=32, geometry="euclidean"), "no_decay")):
        model, loss_fn = build_model(mcfg, data, ents), GeoWeightedInfoNCE()
        groups, manifold, names = param_groups(model, loss_fn, 0.1)
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        listed = names["decay"] + names["no_decay"] + names["manifold"]
        every = [n for n, _ in model.named_parameters()] + ["loss.log_params"]
        assert sorted(listed) == sorted(every)  # each parameter in exactly one group
        assert "anchors" in names[anchors_kind]
        assert {"img_mlp.0.weight", "img_proj.weight", "ent_mlp.0.weight", "ent_mlp.3.weight"} <= set(names["decay"])
        assert {"img_mlp.0.bias", "log_alpha_img", "log_alpha_node", "loss.log_params"} <= set(names["no_decay"])
        assert all(p.ndim >= 2 for p in groups[0]["params"])
        assert all(isinstance(p, geoopt.ManifoldParameter) for p in manifold)


def test_lr_schedule_warms_up_then_decays_to_zero():
    from hierloc.train.optim import lr_lambda as _lr_lambda

    f = _lr_lambda(10, 110)
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and abs(f(60) - 0.5) < 1e-12 and f(110) == 0.0 and f(500) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


# --- k = 1 is the paper's step, k > 1 accumulates the exact gradient ----------------------
def _reference_run(data, ents, mcfg, cfg):
    """The training loop written plainly: the whole table with autograd every step, one optimiser step."""
    from hierloc.model.loss import GeoWeightedInfoNCE
    from hierloc.model.io import build_model
    from hierloc.train.batch_loss import batch_loss
    from hierloc.train.optim import lr_lambda as _lr_lambda, param_groups

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg, data, ents)
    loss_fn = GeoWeightedInfoNCE(betas=cfg.betas, tau=cfg.tau, lam=cfg.lam, sigma_km=cfg.sigma_km,
                                 kernel=cfg.kernel, learnable=cfg.learnable_loss, weighted=cfg.lam > 0)
    groups, manifold, _ = param_groups(model, loss_fn, cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    ropt = geoopt.optim.RiemannianAdam(manifold, lr=cfg.riemannian_lr, stabilize=10)
    n = len(data.features)
    steps = -(-n // cfg.batch_size)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(cfg.warmup_steps, steps * cfg.epochs)) for o in (opt, ropt)]
    params = list(model.parameters()) + list(loss_fn.parameters())
    feats, targets, latlon = (torch.as_tensor(a) for a in (data.features, data.targets, data.latlon_deg))
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        for b0 in range(0, n, cfg.batch_size):
            idx = perm[b0 : b0 + cfg.batch_size]
            tangent = model.entity_tangent()
            loss = batch_loss(model, loss_fn, feats[idx], targets[idx], latlon[idx], model.to_space(tangent), tangent)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step(), ropt.step()
            opt.zero_grad(set_to_none=True), ropt.zero_grad(set_to_none=True)
            for s in sched:
                s.step()
    return model


def test_refresh_every_step_is_the_reference_loop_exactly(tiny, tmp_path):
    data, ents = tiny
    mcfg = ModelConfig(dim=8, hidden=32)  # dropout on: the RNG streams must match too
    # device="cpu": the reference runs on the CPU and the comparison is bit for bit; "auto" would pick
    # CUDA where present (other kernels, bf16 autocast, CUDA's RNG for dropout)
    cfg = TrainConfig(epochs=2, batch_size=64, warmup_steps=5, entity_refresh_every=1, device="cpu")
    ref = _reference_run(data, ents, mcfg, cfg).state_dict()
    got = load_model(train(data, ents, mcfg, cfg, tmp_path).model_path).state_dict()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_table_cycle_gradient_is_the_gradient_of_the_summed_losses(tiny):
    """k steps against the cached table, then one backward through the entity branch, give the
    entity parameters the same gradient as autograd through one table of the k losses."""
    from hierloc.model.loss import GeoWeightedInfoNCE
    from hierloc.model.io import build_model
    from hierloc.train.batch_loss import batch_loss
    from hierloc.train.table_cycle import TableCycle

    data, ents = tiny
    model, loss_fn = build_model(ModelConfig(dim=8, hidden=32, dropout=0.2), data, ents), GeoWeightedInfoNCE()
    model.train()
    feats, targets, latlon = (torch.as_tensor(a) for a in (data.features, data.targets, data.latlon_deg))
    batches = [torch.arange(i * 40, (i + 1) * 40) for i in range(3)]

    torch.manual_seed(5)
    cycle = TableCycle(model, torch.device("cpu"), amp=False)
    cycle.start()
    for idx in batches:
        _, loss, _ = batch_loss(model, loss_fn, feats[idx], targets[idx], latlon[idx], cycle.points, cycle.tangent)
        loss.backward()
        cycle.stash()
        model.zero_grad(set_to_none=False)  # image branch steps every batch: not part of this check
    table = cycle.finish()
    got = {id(p): p.grad.clone() for p in table}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"anchors", "log_alpha_node", "ent_mlp.0.weight"} <= {names[id(p)] for p in table}
    assert "img_proj.weight" not in {names[id(p)] for p in table}

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks for the table, then for each batch's images
    tangent = model.entity_tangent()
    points = model.to_space(tangent)
    total = 0
    for idx in batches:
        total = total + batch_loss(model, loss_fn, feats[idx], targets[idx], latlon[idx], points, tangent)[1]
    (total / len(batches)).backward()
    for p in table:
        torch.testing.assert_close(got[id(p)], p.grad, rtol=1e-4, atol=1e-6, msg=names[id(p)])


@pytest.mark.parametrize("k", [3])
def test_refresh_every_k_still_learns(tiny, tmp_path, k):
    data, ents = tiny
    logged = []
    res = train(data, ents, ModelConfig(dim=8, hidden=32), TrainConfig(**{**FAST, "epochs": 10}, entity_refresh_every=k),
                tmp_path, log_fn=lambda m, s: logged.append(m))
    picks = beam_search(load_model(res.model_path), data.features, k=3).picks
    country_acc = (picks[:, 0] == data.targets[:, 0]).mean()
    majority = np.bincount(data.targets[:, 0]).max() / len(data.targets)
    assert country_acc > majority + 0.2, (country_acc, majority)
    epochs = [m["epoch_loss"] for m in logged if "epoch_loss" in m]
    assert epochs[-1] < epochs[0]
    steps = [m for m in logged if "train_loss" in m]
    assert all(m["steps_per_s"] > 0 and m["samples_per_s"] > m["steps_per_s"] for m in steps)


# --- NaN / inf guards ----------------------------------------------------------------------
def test_nonfinite_loss_stops_naming_the_tensor_and_keeps_the_checkpoint(tiny, tmp_path):
    from hierloc.train.data import TrainData

    data, ents = tiny
    # device="cpu": the CPU path checks every step and names the step exactly; "auto" would pick CUDA
    # where present, whose finite check runs on the device and is read at logging points (issue 15)
    mcfg, cfg = ModelConfig(dim=8, hidden=32), TrainConfig(**{**FAST, "epochs": 3}, device="cpu")

    def crash_in_epoch_2(m, step):
        if m.get("epoch") == 2:
            raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's
    with pytest.raises(KeyboardInterrupt):
        train(data, ents, mcfg, cfg, tmp_path, log_fn=crash_in_epoch_2)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    feats = data.features.copy()
    feats[::7] = np.nan  # a feature cache with bad rows
    bad = TrainData(feats, data.targets, data.latlon_deg)
    with pytest.raises(FloatingPointError, match=r"image points at step 0 is not finite.*Per-level losses.*tau"):
        train(bad, ents, mcfg, cfg, tmp_path / "fresh")
    # Resumes from epoch 1's checkpoint, meets the bad rows, stops: the checkpoint is untouched.
    steps_per_epoch = -(-len(feats) // cfg.batch_size)
    with pytest.raises(FloatingPointError, match=f"image points at step {steps_per_epoch} "):
        train(bad, ents, mcfg, cfg, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "model.pt").exists()


def test_finite_watch_names_the_parameter_and_the_first_bad_step():
    """Gradient norms are recorded on the device each step; the check (at a logging point) names the
    first bad step and every parameter whose gradient was not finite there."""
    from hierloc.train.finite_checks import FiniteWatch

    watch = FiniteWatch(torch.device("cpu"))
    watch.observe_grads(3, ["a", "b"], torch.tensor([1.0, 2.0]))
    watch.check()  # all finite: nothing to say
    watch.observe_grads(7, ["a", "b"], torch.tensor([1.0, float("nan")]))
    watch.observe_grads(8, ["a", "b"], torch.tensor([float("inf"), float("nan")]))
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 7 .*: b: gradient norm nan\. ") as err:
        watch.check()
    assert "a: gradient" not in str(err.value)


# --- mid-epoch checkpoints ----------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_crash_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny, tmp_path, k):
    data, ents = tiny  # 600 images, batch 64: 10 steps per epoch
    mcfg = ModelConfig(dim=8, hidden=32)
    # device="cpu": the resumed and the uninterrupted run are compared bit for bit, which the CPU path
    # promises; "auto" would pick CUDA where present (kernels may reduce in another order per run)
    cfg = TrainConfig(**{**FAST, "epochs": 2, "log_every": 1}, checkpoint_every_steps=4, entity_refresh_every=k,
                      device="cpu")
    full = train(data, ents, mcfg, cfg, tmp_path / "a")

    def crash(m, step):
        if step == 15 and "train_loss" in m:
            raise KeyboardInterrupt  # step 15 is logged before its work is checkpointed
    with pytest.raises(KeyboardInterrupt):
        train(data, ents, mcfg, cfg, tmp_path / "b", log_fn=crash)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (ck["epoch"], ck["batch"], ck["step"]) == (1, 2, 12)  # the last one: mid-epoch 2
    resumed = train(data, ents, mcfg, cfg, tmp_path / "b")
    assert resumed.steps_run == 8 and resumed.steps == full.steps == 20
    assert resumed.final == pytest.approx(full.final, rel=1e-6)
    a = torch.load(full.model_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- warm start ---------------------------------------------------------------------------
def test_entity_row_map():
    from hierloc.train.warm_start import entity_row_map

    rows = entity_row_map(["FR", "FR/IDF", "DE"], ["DE", "IT", "FR", "FR/IDF", "FR/PACA"])
    assert rows.tolist() == [2, -1, 0, 1, -1] and rows.dtype == np.int64
    old = np.random.default_rng(0).permutation([f"k{i}" for i in range(50)])
    new = np.r_[old[::-2], ["n1", "n2"]]
    rows = entity_row_map(old, new)
    assert (old[rows[:-2]] == new[:-2]).all() and (rows[-2:] == -1).all()
    with pytest.raises(ValueError, match="not unique.*FR"):
        entity_row_map(["FR", "FR"], ["FR"])


def _grown(data, ents):
    """The same problem with two new cities appended (rows at the end of the last level)."""
    from hierloc.train.data import EntityData

    n = sum(ents.level_sizes)
    parent = np.r_[ents.parent_index, ents.parent_index[[n - 1, n - 2]]]
    grown = EntityData(np.r_[ents.img_feat, ents.img_feat[[n - 1, n - 2]]], np.r_[ents.latlon_deg, [[10, 10], [20, 20]]].astype(np.float32),
                       [*ents.level_sizes[:-1], ents.level_sizes[-1] + 2], parent)
    keys = [f"e{i}" for i in range(n)]
    return grown, keys, keys + ["new1", "new2"]


def test_warm_start_copies_old_rows_and_keeps_new_ones(tiny, tmp_path):
    from hierloc.model.io import build_model
    from hierloc.train.warm_start import entity_row_map, warm_start

    data, ents = tiny
    mcfg = ModelConfig(dim=8, hidden=32)
    old = load_model(train(data, ents, mcfg, TrainConfig(**{**FAST, "epochs": 2}), tmp_path).model_path)
    grown, old_keys, new_keys = _grown(data, ents)
    torch.manual_seed(0)
    fresh = build_model(mcfg, data, grown)
    new = build_model(mcfg, data, grown)
    new.load_state_dict(fresh.state_dict())
    counts = warm_start(new, tmp_path / "model.pt", entity_row_map(old_keys, new_keys))
    assert counts["rows_copied"] == len(old_keys) and counts["rows_fresh"] == 2 and counts["skipped"] == 0
    n = len(old_keys)
    assert torch.equal(new.anchors[:n], old.anchors) and torch.equal(new.anchors[n:], fresh.anchors[n:])
    assert torch.equal(new.img_proj.weight, old.img_proj.weight) and torch.equal(new.norm.mean, old.norm.mean)
    assert torch.equal(new.entity_latlon_deg, fresh.entity_latlon_deg)  # the new table's data
    with pytest.raises(ValueError, match="init_rows"):
        warm_start(new, tmp_path / "model.pt", None)  # tables differ in size: a row map is required


def test_warm_start_trains_to_a_lower_loss_and_is_part_of_the_digest(tiny, tmp_path):
    from hierloc.train.warm_start import entity_row_map

    data, ents = tiny
    # device="cpu": two runs of one configuration are compared to 1e-6 below, which the CPU path
    # promises; "auto" would pick CUDA where present (kernels may reduce in another order per run)
    mcfg, cfg = ModelConfig(dim=8, hidden=32), TrainConfig(**FAST, device="cpu")
    champion = train(data, ents, mcfg, cfg, tmp_path / "champion").model_path
    grown, old_keys, new_keys = _grown(data, ents)
    one = cfg.model_copy(update={"epochs": 1})
    scratch = train(data, grown, mcfg, one, tmp_path / "scratch")
    warm = train(data, grown, mcfg, one, tmp_path / "warm", init_from=champion,
                 init_rows=entity_row_map(old_keys, new_keys))
    assert warm.final["epoch_loss"] < scratch.final["epoch_loss"] - 0.3, (warm.final, scratch.final)
    # A cold checkpoint in the warm run's folder is not resumed (and vice versa).
    again = train(data, grown, mcfg, one, tmp_path / "scratch", init_from=champion,
                  init_rows=entity_row_map(old_keys, new_keys))
    assert again.epochs_run == 1 and again.final == pytest.approx(warm.final)
