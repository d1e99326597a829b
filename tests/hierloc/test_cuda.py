"""The GPU path against the CPU path (issue 15), skipped without CUDA: beam search, the streamed loss,
a bf16 training run, feature extraction.

Each test runs the same computation on the CPU (the reference the rest of the suite checks) and on
CUDA, or checks what must hold on CUDA (finite, learning). Tolerances: float32 with full-precision
matrix products (``fp32_matmul``: training code may switch them to TF32), bf16 where autocast runs.
"""

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hierloc.geometry import lorentz
from hierloc.infer.search import EntityIndex

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def fp32_matmul():
    """float32 matrix products and convolutions (a ViT's patch embedding) in full precision, not
    TF32, for the test; the settings are restored after."""
    old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(old[0])
    torch.backends.cudnn.allow_tf32 = old[1]


# --- beam search ---------------------------------------------------------------------------------
def _table(seed: int = 0, sizes=(4, 16, 64, 256), d: int = 8, n_queries: int = 300):
    """A hierarchy where each child lies near its parent (tangent norms up to ~2: float32 keeps
    distances apart), and queries near random leaves: (points, sizes, parent, queries)."""
    rng = np.random.default_rng(seed)
    off = np.cumsum([0, *sizes])
    parent = np.full(off[-1], -1, dtype=np.int64)
    tangent = np.zeros((off[-1], d))
    tangent[: sizes[0]] = rng.normal(size=(sizes[0], d)) * 0.5
    for lvl in range(1, len(sizes)):
        rows = slice(off[lvl], off[lvl + 1])
        parent[rows] = off[lvl - 1] + np.arange(sizes[lvl]) % sizes[lvl - 1]
        tangent[rows] = 1.2 * tangent[parent[rows]] + rng.normal(size=(sizes[lvl], d)) * 0.3
    leaf = rng.integers(off[-2], off[-1], n_queries)
    q_tangent = tangent[leaf] + rng.normal(size=(n_queries, d)) * 0.1
    to_points = lambda v: lorentz.expmap0(torch.tensor(v, dtype=torch.float32), k=1.0)  # noqa: E731
    return to_points(tangent), list(sizes), parent, to_points(q_tangent)


def test_beam_search_on_cuda_finds_the_cpu_candidates(fp32_matmul):
    points, sizes, parent, q = _table()
    cpu = EntityIndex(points, sizes, parent).search(q, k=5, backend="torch")
    gpu = EntityIndex(points, sizes, parent, device=DEVICE).search(q, k=5, backend="torch")
    np.testing.assert_array_equal(gpu.rows[:, 0], cpu.rows[:, 0])
    same_set = (np.sort(gpu.rows, 1) == np.sort(cpu.rows, 1)).all(1)
    assert same_set.mean() >= 0.99, same_set.mean()  # a near tie in float32 may swap the 5th candidate
    np.testing.assert_allclose(gpu.sq_dist[:, 0], cpu.sq_dist[:, 0], rtol=1e-9)  # float64 re-score, same keys
    np.testing.assert_array_equal(gpu.paths[:, 0], cpu.paths[:, 0])
    assert (gpu.n_scored == cpu.n_scored).mean() >= 0.99
    try:
        import faiss  # noqa: F401
    except ImportError:
        return
    ref = EntityIndex(points, sizes, parent).search(q, k=5, backend="faiss")  # the CPU default
    np.testing.assert_array_equal(gpu.rows[:, 0], ref.rows[:, 0])


# --- the streamed loss -----------------------------------------------------------------------------
def _loss_and_grads(device: str, naive: bool, chunk: int | None, geometry: str):
    from hierloc.model.loss import GeoWeightedInfoNCE

    g = torch.Generator().manual_seed(0)
    b, n, d = 64, 1000, 8
    zt, ht = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    target = torch.randint(0, n, (b,), generator=g)
    target[1] = -1  # an ignored row
    span = torch.tensor([170.0, 360.0])
    img_ll, ent_ll = torch.rand(b, 2, generator=g) * span - span / 2, torch.rand(n, 2, generator=g) * span - span / 2
    zt, ht = zt.to(device).requires_grad_(), ht.to(device).requires_grad_()
    k = torch.tensor(1.3, device=device, requires_grad=True)
    loss = GeoWeightedInfoNCE(betas=(1.0,), tau=0.7, lam=2.0, sigma_km=400.0).to(device)
    z, h = (lorentz.expmap0(zt, k=k), lorentz.expmap0(ht, k=k)) if geometry == "lorentz" else (zt, ht)
    val = loss.level_loss_points(z, h, target.to(device), img_ll.to(device), ent_ll.to(device), k=k,
                                 geometry=geometry, chunk=chunk, naive=naive)
    val.backward()
    # Euclidean distances do not involve K: no gradient (zero here, as on the CPU)
    return [torch.zeros(()) if t is None else t.detach().cpu() for t in (val, zt.grad, ht.grad, k.grad, loss.log_params.grad)]


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_streamed_loss_equals_the_materialised_one_on_cuda(fp32_matmul, geometry):
    naive = _loss_and_grads(DEVICE, True, None, geometry)
    streamed = _loss_and_grads(DEVICE, False, 128, geometry)  # 8 chunks of 128 entities
    on_cpu = _loss_and_grads("cpu", True, None, geometry)
    for name, a, b, c in zip(["loss", "z", "h", "K", "log tau/lambda/sigma"], naive, streamed, on_cpu):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"streamed vs materialised: {name}")
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5, msg=f"cuda vs cpu: {name}")
    assert naive[1].abs().sum() > 0 and naive[2].abs().sum() > 0


# --- a bf16 training run ---------------------------------------------------------------------------
def test_bf16_training_on_cuda_stays_finite_and_learns(tiny, tmp_path):
    from hierloc.infer.beam import beam_search
    from hierloc.model.io import load_model
    from hierloc.model.model import ModelConfig
    from hierloc.train.loop import TrainConfig, train

    data, ents = tiny  # 600 images, clustered features, 3 countries / 24 cities
    logged = []
    cfg = TrainConfig(epochs=10, batch_size=64, warmup_steps=5, log_every=1, device=DEVICE, amp=True)
    res = train(data, ents, ModelConfig(dim=8, hidden=32), cfg, tmp_path, log_fn=lambda m, s: logged.append(m))
    losses = [m["train_loss"] for m in logged if "train_loss" in m]
    assert len(losses) == res.steps == 100 and np.isfinite(losses).all()
    epochs = [m["epoch_loss"] for m in logged if "epoch_loss" in m]
    assert epochs[-1] < 0.8 * epochs[0], epochs  # clearly lower (the same run on the CPU: 8.52 -> 5.89, 0.69x)
    model = load_model(res.model_path)
    picks = beam_search(model, data.features, k=3, device=DEVICE).picks
    country_acc = (picks[:, 0] == data.targets[:, 0]).mean()
    majority = np.bincount(data.targets[:, 0]).max() / len(data.targets)
    assert country_acc > majority + 0.2, (country_acc, majority)
    cpu_picks = beam_search(model, data.features, k=3, device="cpu").picks
    assert (cpu_picks[:, -1] == picks[:, -1]).mean() >= 0.98


# --- feature extraction ----------------------------------------------------------------------------
#: An open_clip ViT small enough for a test (tests/hierloc/features/test_extract.py's TINY_CLIP).
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _sample_shard(root: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """The real OSV-5M sample photos (tests/conftest.py finds them) in one zip shard."""
    photos = sorted((Path(os.environ["HIERLOC_OSV5M_SAMPLE"]) / "images").glob("*.jpg"))
    assert photos, "no OSV-5M sample photos"
    ids = np.arange(1, len(photos) + 1, dtype=np.int64) * 1_000_003
    (root / "images").mkdir(parents=True)
    with zipfile.ZipFile(root / "images" / "00.zip", "w", zipfile.ZIP_STORED) as zf:
        for i, p in zip(ids, photos):
            zf.writestr(f"{i}.jpg", p.read_bytes())
    return ids, ["images/00.zip"] * len(ids), [f"{i}.jpg" for i in ids]


@pytest.mark.parametrize("kind", ["pixelstats", "tiny open_clip"])
def test_feature_extraction_on_cuda_matches_the_cpu(tmp_path, fp32_matmul, kind):
    from geodata.ingest.image_store import ImageStore
    from hierloc.features.backbones import load_backbone
    from hierloc.features.extract import extract_features
    from hierloc.features.views import load_features

    if kind == "pixelstats":
        spec = "fixed:pixelstats"
    else:
        cfg = tmp_path / "hierloc-test-tiny-vit.json"
        cfg.write_text(json.dumps(TINY_CLIP))
        spec = f"open_clip:{cfg}"
    ids, containers, members = _sample_shard(tmp_path)
    store, backbone = ImageStore(tmp_path), load_backbone(spec)

    def features(name: str, **kw) -> np.ndarray:
        ex = extract_features(ids, containers, members, store.open, backbone, tmp_path / name, batch_size=8, **kw)
        assert ex.failures == 0
        return load_features(tmp_path / name, ids)

    ref = features("cpu", device="cpu", num_workers=0)
    # DataLoader workers (forked after CUDA is initialised: they must not touch it), pinned batches
    fp32 = features("cuda-fp32", device=DEVICE, precision="fp32", num_workers=2)
    bf16 = features("cuda-bf16", device=DEVICE, precision="bf16", num_workers=2)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(fp32, ref, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(bf16, ref, rtol=0.05, atol=0.05 * scale)  # bf16: 8 bits of mantissa
    cos = (bf16 * ref).sum(1) / (np.linalg.norm(bf16, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99, cos.min()
