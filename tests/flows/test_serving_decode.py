"""No train/serve skew: a bundle serves photos decoded as its training features were.

The real features stage (reduced-scale JPEG decoding on, and off) encodes the real OSV-5M sample
photos with a random-init open_clip ViT (224 px, open_clip's own preprocess); the export records how;
the Predictor, the pyfunc model, ``hierloc predict`` and ``hierloc evaluate`` then serve exactly the
features the stage computed for each photo. Bit for bit needs the same batch: on the CPU a matrix
product's rounding depends on the batch it runs in (up to 4e-7 here), so the stage and every
serving path run batches of one photo.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli.main import app
from flows.stages.export import run_export
from flows.stages.features import run_features
from geodata.ingest.image_decode import decode_image
from hierloc.features.views import load_features
from hierloc.infer.predictor import Predictor, predictions_frame
from hierloc.model.io import save_model
from hierloc.model.model import HierLocModel, ModelConfig
from tests.hierloc.features.sample_shard import TINY_CLIP_224, write_clip_spec

SAMPLE = Path(os.environ["HIERLOC_OSV5M_SAMPLE"])
LEVEL_SIZES = [2, 4, 8, 16]  # fan-out 2 below the countries


def _stage_inputs(root: Path, photos: list[Path]) -> tuple[Path, Path]:
    """The photos in zip shards (the last 6 the test split) and the manifests the ingest writes."""
    data, ingest = root / "data", root / "ingest"
    (ingest / "manifest").mkdir(parents=True)
    for split, part in (("train", photos[:-6]), ("test", photos[-6:])):
        (data / "images" / split).mkdir(parents=True)
        with zipfile.ZipFile(data / "images" / split / "00.zip", "w") as zf:
            for p in part:
                zf.writestr(p.name, p.read_bytes())
        pd.DataFrame({"id": [int(p.stem) for p in part], "latitude": 0.0, "longitude": 0.0,
                      "image_container": f"images/{split}/00.zip", "image_member": [p.name for p in part]}
                     ).to_parquet(ingest / "manifest" / f"{split}.parquet", index=False)
    return data, ingest


def _head(d_img: int, root: Path) -> tuple[Path, Path]:
    """A random-init HierLoc head for d_img features over a 4-level hierarchy: model.pt, hierarchy/entities.parquet."""
    rng = np.random.default_rng(0)
    offsets = np.cumsum([0, *LEVEL_SIZES])
    parent = np.full(offsets[-1], -1, dtype=np.int64)
    for lvl in range(1, 4):
        parent[offsets[lvl] : offsets[lvl + 1]] = offsets[lvl - 1] + np.arange(LEVEL_SIZES[lvl]) // 2
    latlon = np.c_[rng.uniform(-60, 60, offsets[-1]), rng.uniform(-180, 180, offsets[-1])]
    torch.manual_seed(0)
    model = HierLocModel(ModelConfig(dim=8, hidden=32), torch.zeros(d_img), torch.ones(d_img),
                         torch.tensor(rng.normal(size=(offsets[-1], d_img)), dtype=torch.float32),
                         torch.tensor(latlon, dtype=torch.float32), LEVEL_SIZES, torch.tensor(parent))
    save_model(model.eval(), root / "model.pt")
    (root / "hierarchy").mkdir()
    level = np.repeat(np.arange(4), LEVEL_SIZES)
    pd.DataFrame({"key": [f"e{i}" for i in range(offsets[-1])], "name": [f"place {i}" for i in range(offsets[-1])],
                  "lat": latlon[:, 0], "lon": latlon[:, 1], "level": level}).to_parquet(
        root / "hierarchy" / "entities.parquet", index=False)
    return root / "model.pt", root / "hierarchy"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> SimpleNamespace:
    """The features stage with and without reduced-scale decoding (batches of one photo), and three
    bundles of one head: ``fast`` (exported from the reduced-scale run), ``full`` (from the full-decode
    run) and ``old`` (``full`` with bundle.json as written before the fast_decode field existed)."""
    root = tmp_path_factory.mktemp("serve_decode")
    spec = write_clip_spec(root)
    photos = sorted((SAMPLE / "images").glob("*.jpg"))
    assert len(photos) >= 20
    data, ingest = _stage_inputs(root, photos)
    model_path, hierarchy = _head(TINY_CLIP_224["embed_dim"], root)
    ns = SimpleNamespace(spec=spec, root=root, bundles={}, stage={}, feats={})
    for name, fast in (("fast", True), ("full", False)):
        out = run_features(data, ingest, root / "features", spec, batch_size=1, num_workers=0, fast_decode=fast)
        ns.stage[name] = out
        ns.feats[name] = {p.name: f for p, f in zip(photos, load_features(Path(out["cache"]),
                                                                          np.array([int(p.stem) for p in photos])))}
        ns.bundles[name] = run_export(model_path, hierarchy, spec, None, root / "export" / name,
                                      fast_decode=out["fast_decode"])
    old = shutil.copytree(ns.bundles["full"], root / "export" / "old")
    meta = json.loads((old / "bundle.json").read_text())
    del meta["fast_decode"]
    (old / "bundle.json").write_text(json.dumps(meta))
    ns.bundles["old"] = old
    ns.photos = {p.name: p for p in photos}
    return ns


def _answers(predictor: Predictor, feats: list[np.ndarray], top_k: int = 5, beam_k: int = 10) -> list[dict]:
    """What the predictor answers for these features, one row per search (as each path below runs them)."""
    return [predictor.predict_features(f[None], top_k=top_k, beam_k=beam_k)[0].to_dict() for f in feats]


def test_the_bundle_records_how_the_features_stage_decoded(served):
    assert served.stage["fast"]["fast_decode"] is True and served.stage["full"]["fast_decode"] is False
    metas = {k: json.loads((b / "bundle.json").read_text()) for k, b in served.bundles.items()}
    assert metas["fast"]["fast_decode"] is True and metas["full"]["fast_decode"] is False
    assert "fast_decode" not in metas["old"]
    loaded = {k: Predictor.load(b) for k, b in served.bundles.items()}
    assert [loaded[k].backbone.fast_decode for k in ("fast", "full", "old")] == [True, False, False]
    assert [loaded[k].decode_min_side for k in ("fast", "full", "old")] == [224, None, None]  # open_clip: Resize(224)
    assert Predictor.load(served.bundles["fast"], with_backbone=False).decode_min_side is None
    bad = shutil.copytree(served.bundles["fast"], served.root / "export" / "bad")
    (bad / "bundle.json").write_text(json.dumps({**metas["fast"], "fast_decode": "yes"}))
    with pytest.raises(ValueError, match=r"bad/bundle.json: field fast_decode must be true or false, got 'yes'"):
        Predictor.load(bad)


def test_a_fast_decode_bundle_serves_the_features_the_stage_computed_bit_for_bit(served):
    predictor = Predictor.load(served.bundles["fast"])
    for name, path in served.photos.items():
        image = decode_image(path.read_bytes(), name, min_side=predictor.decode_min_side)
        assert min(image.size) >= 224 and image.width < image.info["full_size"][0] / 1.9  # 909x512 -> 455x256
        got = predictor.image_features([image], batch_size=1)[0]
        assert np.array_equal(got, served.feats["fast"][name]), name
        assert not np.array_equal(got, served.feats["full"][name])  # the decoding matters


def test_an_old_bundle_serves_todays_features_exactly(served):
    """A bundle from before the fast_decode field: full decodes, the whole transform per image (today's
    serving code), the features the full-decode stage computed."""
    predictor = Predictor.load(served.bundles["old"])
    bb = predictor.backbone
    for name, path in served.photos.items():
        image = decode_image(path.read_bytes(), name, min_side=predictor.decode_min_side)
        assert "draft_box" not in image.info and image.size == decode_image(path.read_bytes(), name).size
        got = predictor.image_features([image], batch_size=1)[0]
        today = bb.encode(torch.stack([bb.transform(image)])).float().numpy()[0]
        assert np.array_equal(got, today) and np.array_equal(got, served.feats["full"][name]), name


def test_the_pyfunc_decodes_photos_as_the_bundle_says(served, tmp_path):
    """Photo bytes (base64, as a JSON request carries them) and paths: the answers for the features the
    stage computed for those photos (one row per request: batches of one); an old bundle: full decodes."""
    import mlflow

    from flows.serving.logged_model import save_pyfunc

    names = sorted(served.photos)[:3]
    for kind, stage in (("fast", "fast"), ("old", "full")):
        model = mlflow.pyfunc.load_model(str(save_pyfunc(served.bundles[kind], tmp_path / kind)),
                                         model_config={"path_root": str(SAMPLE / "images")})
        predictor = Predictor.load(served.bundles[kind], with_backbone=False)
        for name in names:
            want = predictions_frame(predictor.predict_features(served.feats[stage][name][None], top_k=5, beam_k=10))
            b64 = base64.b64encode(served.photos[name].read_bytes()).decode()
            for column, value in (("image", b64), ("path", name)):
                got = model.predict(pd.DataFrame({column: [value]}))
                assert got["error"].tolist() == [""], got["error"].tolist()
                pd.testing.assert_frame_equal(got.drop(columns="error"), want, check_exact=True, obj=f"{kind} {column}")


def test_hierloc_predict_decodes_photos_as_the_bundle_says(served):
    names = sorted(served.photos)[:3]
    for kind, stage in (("fast", "fast"), ("old", "full")):
        args = ["predict", *(str(served.photos[n]) for n in names), "--model", str(served.bundles[kind]),
                "--batch-size", "1", "--json"]
        res = CliRunner().invoke(app, args, catch_exceptions=False)
        assert res.exit_code == 0, res.stderr
        docs = json.loads(res.stdout)
        want = _answers(Predictor.load(served.bundles[kind], with_backbone=False),
                        [served.feats[stage][n] for n in names])
        assert [d["file"] for d in docs] == [str(served.photos[n]) for n in names]
        assert [{k: d[k] for k in w} for d, w in zip(docs, want)] == want, kind


def test_hierloc_evaluate_decodes_photos_as_the_bundle_says(served, tmp_path):
    """The benchmark path (hierloc evaluate): the sample's select.csv rows that have a photo."""
    from flows.report.benchmark import evaluate_benchmark

    evaluate_benchmark(served.bundles["fast"], SAMPLE / "select.csv", SAMPLE / "images", batch_size=1, beam_k=10,
                       out_dir=tmp_path)
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    assert len(preds) == 6
    predictor = Predictor.load(served.bundles["fast"], with_backbone=False)
    want = _answers(predictor, [served.feats["fast"][f"{i}.jpg"] for i in preds["id"]], top_k=1)
    for lvl in ("country", "region", "subregion", "city"):
        assert preds[f"pick_{lvl}"].tolist() == [w["levels"][lvl]["key"] for w in want]
        assert preds[f"pick_{lvl}_prob"].tolist() == [w["levels"][lvl]["prob"] for w in want]
    assert preds["latitude"].tolist() == [w["latitude"] for w in want]
