"""`hierloc predict` and `hierloc evaluate` on the real OSV-5M sample photos, with a real trained bundle."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli.main import app
from hierloc.geometry.geo import haversine_km
from hierloc.infer.metrics import RADII_KM

SAMPLE = Path(os.environ["HIERLOC_OSV5M_SAMPLE"])
PHOTOS = sorted((SAMPLE / "images").glob("*.jpg"))
LEVELS = ("country", "region", "subregion", "city")
METRIC_KEYS = ("geoscore", "mean_km", "median_km", *(f"acc_{lv}" for lv in LEVELS),
               *(f"acc_{r}km" for r in RADII_KM), *(f"pick_acc_{lv}" for lv in LEVELS))

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def predict_json(*args: str) -> tuple[list[dict], object]:
    res = invoke("predict", *args, "--json")
    assert res.stdout.lstrip().startswith("["), (res.exit_code, res.stdout[:300], res.stderr[-800:])
    return json.loads(res.stdout), res


@pytest.fixture(scope="module")
def select() -> pd.DataFrame:
    return pd.read_csv(SAMPLE / "select.csv", dtype=str, keep_default_na=False)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data: what a
    decompression bomb looks like to a reader that trusts the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# --- predict -----------------------------------------------------------------------------
def check_answer(entry: dict, top_k: int) -> None:
    assert entry["error"] is None
    cands = entry["candidates"]
    assert len(cands) == top_k
    probs = [c["prob"] for c in cands]
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
    assert probs == sorted(probs, reverse=True)
    assert [c["rank"] for c in cands] == list(range(1, top_k + 1))
    level_probs = [entry["levels"][lv]["prob"] for lv in LEVELS]
    assert all(a >= b - 1e-6 for a, b in zip(level_probs, level_probs[1:])), level_probs  # coarse >= fine
    assert -90 <= entry["latitude"] <= 90 and -180 <= entry["longitude"] <= 180
    assert entry["path"] == " > ".join(entry["levels"][lv]["name"] or "-" for lv in LEVELS)
    # the answer is the picked city: its key is the last level's, and its coordinates a candidate's or an entity's
    assert entry["levels"]["city"]["key"].startswith(entry["levels"]["subregion"]["key"] + "|")


def test_predict_files_and_a_folder_agree(demo_bundle):
    files = PHOTOS[:2]
    by_file, res = predict_json(*files, "--model", demo_bundle, "--top-k", 5)
    assert res.exit_code == 0, res.stderr
    assert [e["file"] for e in by_file] == [str(f) for f in files]
    for entry in by_file:
        check_answer(entry, top_k=5)
    # the folder, in batches of 4: every photo once, and batching changes no answer
    by_folder, res = predict_json(SAMPLE / "images", "--model", demo_bundle, "--top-k", 5, "--batch-size", 4)
    assert res.exit_code == 0, res.stderr
    assert [Path(e["file"]).name for e in by_folder] == [p.name for p in PHOTOS]
    same = {e["file"]: e for e in by_folder}
    for entry in by_file:
        other = same[entry["file"]]
        assert {lv: v["key"] for lv, v in other["levels"].items()} == {lv: v["key"] for lv, v in entry["levels"].items()}
        assert [v["prob"] for v in other["levels"].values()] == pytest.approx([v["prob"] for v in entry["levels"].values()], abs=1e-5)
        assert [c["key"] for c in other["candidates"]] == [c["key"] for c in entry["candidates"]]
        assert [c["prob"] for c in other["candidates"]] == pytest.approx([c["prob"] for c in entry["candidates"]], abs=1e-5)


def test_predict_human_output(demo_bundle):
    (entry,), _ = predict_json(PHOTOS[0], "--model", demo_bundle, "--top-k", 3)
    res = invoke("predict", PHOTOS[0], "--model", demo_bundle, "--top-k", 3)
    assert res.exit_code == 0
    out = res.stdout
    assert out.splitlines()[0] == str(PHOTOS[0])
    for lv in LEVELS:
        assert f"{100 * entry['levels'][lv]['prob']:5.1f}%" in out
    assert entry["path"] in out and f"{entry['latitude']:9.4f}" in out
    assert "top 3 candidates" in out
    rows = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 3]
    assert "ms/photo" in res.stderr and "ms/photo" not in out


def test_predict_map_one_and_several(demo_bundle, tmp_path):
    one = tmp_path / "one.png"
    res = invoke("predict", PHOTOS[0], "--model", demo_bundle, "--map", one)
    assert res.exit_code == 0
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"map: {one}" in res.stdout
    assert Image.open(one).size[0] > 500
    many = tmp_path / "many.png"
    docs, res = predict_json(*PHOTOS[:2], "--model", demo_bundle, "--map", many)
    assert res.exit_code == 0
    for photo, entry in zip(PHOTOS[:2], docs):
        png = tmp_path / f"many-{photo.stem}.png"
        assert entry["map"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not many.exists()


def test_predict_reports_each_bad_input_and_answers_the_rest(demo_bundle, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file, not a photo\n")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(header_only_png(8000, 8000))  # 64 Mpx claimed > the 40 Mpx default
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "no-such-photo.jpg"
    args = [text, PHOTOS[0], missing, bomb, empty]
    docs, res = predict_json(*args, "--model", demo_bundle)
    assert res.exit_code == 1
    assert [e["file"] for e in docs] == [str(a) for a in args]
    err = {e["file"]: e["error"] for e in docs}
    check_answer(docs[1], top_k=5)
    assert "cannot decode image" in err[str(text)]
    assert "no such file or folder" in err[str(missing)]
    assert "8000x8000" in err[str(bomb)] and "decompression bomb" in err[str(bomb)]
    assert "no photos" in err[str(empty)]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 4
    for bad in (text, missing, bomb, empty):
        assert sum(ln.startswith(f"error: {bad}: ") for ln in lines) == 1
    assert "answered 1 of 5" in res.stderr
    # human mode: the same errors, the answered photo on stdout
    res = invoke("predict", *args, "--model", demo_bundle)
    assert res.exit_code == 1 and res.stdout.startswith(str(PHOTOS[0]))
    assert "no-such-photo.jpg" not in res.stdout and "no-such-photo.jpg" in res.stderr


def test_predict_max_pixels_refuses_large_photos(demo_bundle, tmp_path):
    small = tmp_path / "small.png"
    with Image.open(PHOTOS[0]) as im:
        im.convert("RGB").resize((96, 64)).save(small)
    docs, res = predict_json(small, PHOTOS[0], "--model", demo_bundle, "--max-pixels", 100_000)
    assert res.exit_code == 1
    assert docs[0]["error"] is None and "max_image_pixels=100000" in docs[1]["error"]


def test_predict_exit_2_when_nothing_is_answered(demo_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = invoke("predict", empty, "--model", demo_bundle)
    assert res.exit_code == 2 and f"error: {empty}: no photos" in res.stderr and res.stdout == ""
    docs, res = predict_json(empty, tmp_path / "gone.jpg", "--model", demo_bundle)
    assert res.exit_code == 2 and len(docs) == 2 and all(d["error"] for d in docs)
    assert invoke("predict", PHOTOS[0], "--model", demo_bundle, "--top-k", 0).exit_code == 2  # bad argument


def test_predict_without_a_bundle_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("flows.settings.WORK_DIR", tmp_path / "work")
    res = invoke("predict", PHOTOS[0])
    assert res.exit_code == 2
    assert "make demo" in res.stderr and "--model" in res.stderr and res.stdout == ""
    res = invoke("predict", PHOTOS[0], "--model", tmp_path)  # a folder that is no bundle
    assert res.exit_code == 2 and "bundle.json" in res.stderr


def test_predict_uses_the_last_export_by_default(demo_work, monkeypatch):
    monkeypatch.setattr("flows.settings.WORK_DIR", demo_work)
    (entry,), res = predict_json(PHOTOS[0])
    assert res.exit_code == 0
    check_answer(entry, top_k=5)


def test_predict_from_mlflow_models(demo_bundle, tmp_path, monkeypatch):
    """A saved pyfunc folder and a runs:/ URI logged to a real (temporary) tracking store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.serving.logged_model import log_pyfunc, save_pyfunc

    (direct,), _ = predict_json(PHOTOS[0], "--model", demo_bundle)
    (saved,), res = predict_json(PHOTOS[0], "--model", save_pyfunc(demo_bundle, tmp_path / "pyfunc"))
    assert res.exit_code == 0 and saved["levels"] == direct["levels"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        exp = client.create_experiment("cli", artifact_location=(tmp_path / "artifacts").as_uri())
        run_id = client.create_run(exp).info.run_id
        model_uri = log_pyfunc(client, run_id, demo_bundle)
        (logged,), res = predict_json(PHOTOS[0], "--model", model_uri)
        assert res.exit_code == 0 and logged["levels"] == direct["levels"]
        res = invoke("predict", PHOTOS[0], "--model", "runs:/0123456789abcdef/model")
        assert res.exit_code == 2 and "runs:/0123456789abcdef/model" in res.stderr and uri in res.stderr
    finally:
        mlflow.set_tracking_uri(old)



class _Payload:
    """Unpickling this calls os.system(touch <marker>): a hostile model.pt."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_predict_with_a_crafted_model_file_runs_no_code(demo_bundle, tmp_path):
    """A bundle folder, and an MLflow model folder, whose model.pt unpickles to a payload."""
    import torch

    from flows.serving.logged_model import save_pyfunc

    marker = tmp_path / "pwned"
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    torch.save({"format": 2, "state_dict": {}, "model_config": {}, "level_sizes": [1], "x": _Payload(marker)},
               bundle / "model.pt")
    res = invoke("predict", PHOTOS[0], "--model", bundle)
    assert res.exit_code == 2 and f"{bundle / 'model.pt'}: refused as a model file" in res.stderr
    assert not marker.exists()

    folder = save_pyfunc(demo_bundle, tmp_path / "pyfunc")
    (inner,) = [p for p in (folder / "artifacts").iterdir() if (p / "model.pt").is_file()]
    shutil.copy2(bundle / "model.pt", inner / "model.pt")
    res = invoke("predict", PHOTOS[0], "--model", folder)
    assert res.exit_code == 2 and f"{inner / 'model.pt'}: refused as a model file" in res.stderr
    assert not marker.exists()


# --- evaluate ----------------------------------------------------------------------------
@pytest.fixture()
def im2gps_like(tmp_path, select) -> tuple[Path, Path, pd.DataFrame]:
    """An Im2GPS3k-format CSV as GeoEstimation ships it (header LON,LAT; values latitude first)
    over copies of the sample photos with known coordinates, plus a row whose photo is
    missing (line 8) and a row with a bad coordinate (line 9)."""
    images = tmp_path / "im2gps3k"
    images.mkdir()
    known = select[select["id"].isin({p.stem for p in PHOTOS})].reset_index(drop=True)
    assert len(known) == 6
    lines = ["IMG_ID,AUTHOR,LON,LAT,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban"]
    names = []
    for r in known.itertuples():
        name = f"{r.id}_8c1f2e3a4b_1234_12345678@N00.jpg"
        shutil.copy(SAMPLE / "images" / f"{r.id}.jpg", images / name)
        lines.append(f"{name},12345678@N00,{r.true_lat},{r.true_lon},1,5,120,0.0415,0.5264,0.4321")
        names.append(name)
    lines.append("1000_deadbeef00_1_1@N00.jpg,1@N00,48.8584,2.2945,1,5,120,0.1,0.5,0.4")
    lines.append("1001_deadbeef01_1_1@N00.jpg,1@N00,north,2.2945,1,5,120,0.1,0.5,0.4")
    meta = tmp_path / "im2gps3k_places365.csv"
    meta.write_text("\n".join(lines) + "\n")
    return meta, images, known.assign(image=names)


def evaluate_json(*args) -> tuple[dict, object]:
    res = invoke("evaluate", *args, "--json")
    return (json.loads(res.stdout) if res.exit_code == 0 else None), res


def test_evaluate_im2gps3k(demo_bundle, im2gps_like, tmp_path):
    meta, images, known = im2gps_like
    out = tmp_path / "out"
    res_dict, res = evaluate_json("--model", demo_bundle, "--meta", meta, "--images", images, "--out", out,
                                  "--max-bad-fraction", 0.5)
    assert res.exit_code == 0, res.stderr
    r = res_dict
    assert r["format"] == "im2gps3k" and r["swapped"] is True and "swapped" in r["swap_evidence"]
    assert (r["n_rows"], r["n_evaluated"], r["n_missing_images"], r["n_quarantined"]) == (8, 6, 1, 1)
    assert r["inclusive"] is True and r["variant"] == "official"
    assert set(METRIC_KEYS) <= set(r["metrics"]) and r["metrics"]["n"] == 6
    named = {(s["kind"], s["image"] or s["line"]) for s in r["skipped_examples"]}
    assert named == {("missing_image", "1000_deadbeef00_1_1@N00.jpg"), ("quarantined", 9)}

    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == 6
    # the swap was applied: the truth is the sample's (latitude, longitude)
    truth = known.set_index("image").loc[preds["image"]]
    np.testing.assert_allclose(preds["true_latitude"], truth["true_lat"].astype(float))
    np.testing.assert_allclose(preds["true_longitude"], truth["true_lon"].astype(float))
    d = haversine_km(preds["latitude"].to_numpy(), preds["longitude"].to_numpy(),
                     preds["true_latitude"].to_numpy(), preds["true_longitude"].to_numpy())
    np.testing.assert_allclose(preds["dist_km"], d, rtol=1e-9)
    for radius in RADII_KM:  # inclusive: d <= r, as the Im2GPS code counts
        assert r["metrics"][f"acc_{radius}km"] == pytest.approx(float(np.mean(d <= radius)))
    assert r["metrics"]["median_km"] == pytest.approx(float(np.median(d)))
    assert r["metrics"]["pick_acc_country"] == pytest.approx(float(preds["pick_hit_country"].mean()))
    assert {f"pick_{lv}" for lv in LEVELS} <= set(preds.columns)

    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    assert sorted(skipped["kind"]) == ["missing_image", "quarantined"]
    bad = skipped[skipped["kind"] == "quarantined"].iloc[0]
    assert bad["line"] == "9" and bad["value"] == "north"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["geoscore"] == pytest.approx(r["metrics"]["geoscore"])
    for fig in ("error_map.png", "error_cdf.png"):
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --strict overrides the benchmark's rule; the human table is printed
    res = invoke("evaluate", "--model", demo_bundle, "--meta", meta, "--images", images, "--max-bad-fraction", 0.5,
                 "--strict")
    assert res.exit_code == 0
    assert "d < r (strict)" in res.stdout and "acc_2500km" in res.stdout and "quarantined 1" in res.stdout
    assert "missing images 1" in res.stdout and "line 9 LON='north'" in res.stdout


def test_evaluate_refuses_a_mostly_bad_file_and_a_wrong_folder(demo_bundle, im2gps_like, tmp_path):
    meta, images, _ = im2gps_like
    res = invoke("evaluate", "--model", demo_bundle, "--meta", meta, "--images", images)
    assert res.exit_code == 2 and "max_bad_fraction" in res.stderr and "line 9" in res.stderr
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    res = invoke("evaluate", "--model", demo_bundle, "--meta", meta, "--images", empty, "--max-bad-fraction", 0.5)
    assert res.exit_code == 2 and "no benchmark row could be evaluated" in res.stderr and "--images" in res.stderr
    res = invoke("evaluate", "--model", demo_bundle, "--meta", meta, "--images", images, "--format", "im2gps")
    assert res.exit_code == 2 and "--format" in res.stderr


@pytest.mark.parametrize("variant", ["official", "corrected"])
def test_evaluate_osv5m_sample(demo_bundle, select, tmp_path, variant):
    """The sample's select.csv is OSV-5M test rows; six of its photos are in images/."""
    out = tmp_path / "out"
    r, res = evaluate_json("--model", demo_bundle, "--meta", SAMPLE / "select.csv", "--images", SAMPLE / "images",
                           "--variant", variant, "--out", out)
    assert res.exit_code == 0, res.stderr
    assert r["format"] == "osv5m" and r["variant"] == variant and r["inclusive"] is False and r["swapped"] is False
    assert (r["n_rows"], r["n_evaluated"], r["n_missing_images"], r["n_quarantined"]) == (50, 6, 44, 0)
    assert set(METRIC_KEYS) <= set(r["metrics"])
    preds = pd.read_parquet(out / "predictions.parquet")
    truth = select.set_index("id").loc[preds["id"]]
    np.testing.assert_allclose(preds["true_latitude"], truth["true_lat"].astype(float))
    for radius in RADII_KM:  # strict: d < r, as the OSV-5M code counts
        assert r["metrics"][f"acc_{radius}km"] == pytest.approx(float(np.mean(preds["dist_km"] < radius)))
    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    assert (skipped["kind"] == "missing_image").sum() == 44
    assert set(skipped["image"]) == {f"{i}.jpg" for i in select["id"]} - {p.name for p in PHOTOS}


def test_evaluate_osv5m_quarantines_bad_rows(demo_bundle, select, tmp_path):
    """An OSV-5M test.csv (release column names) with a duplicate id and an out-of-range latitude."""
    test = pd.DataFrame({"id": select["id"], "latitude": select["true_lat"], "longitude": select["true_lon"],
                         "country": select["country"], "region": select["region"], "sub-region": select["area"],
                         "city": select["city"]})
    test.loc[3, "latitude"] = "95.0"
    test = pd.concat([test, test.iloc[[9]]], ignore_index=True)  # line 52 repeats line 11
    meta = tmp_path / "test.csv"
    test.to_csv(meta, index=False)
    r, res = evaluate_json("--model", demo_bundle, "--meta", meta, "--images", SAMPLE / "images")
    assert res.exit_code == 0, res.stderr
    assert r["format"] == "osv5m" and r["n_quarantined"] == 2 and r["n_evaluated"] == 6 and r["n_rows"] == 51
    reasons = {s["line"]: s["reason"] for s in r["skipped_examples"] if s["kind"] == "quarantined"}
    assert "outside [-90, 90]" in reasons[5] and reasons[52] == "duplicate id, kept line 11"


# --- special and huge files (issue 12, item 4) ---------------------------------------------
@pytest.mark.timeout(120)
def test_predict_refuses_fifos_devices_and_huge_files_without_reading_them(demo_bundle, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(PHOTOS[0], folder / "a.jpg")
    os.mkfifo(folder / "b.jpg")
    (folder / "c.jpg").symlink_to("/dev/zero")
    with open(folder / "d.jpg", "wb") as fh:
        fh.truncate(1_500_000_000)  # sparse: 1.5 GB of zeros that take no disk
    os.mkfifo(tmp_path / "named.jpg")
    docs, res = predict_json(folder, tmp_path / "named.jpg", "--model", demo_bundle)
    err = {Path(e["file"]).name: e["error"] for e in docs}
    assert set(err) == {"a.jpg", "b.jpg", "c.jpg", "d.jpg", "named.jpg"} and err["a.jpg"] is None
    assert err["b.jpg"] == err["named.jpg"] == "not a regular file (fifo); refused, never read"
    assert err["c.jpg"] == "not a regular file (character device); refused, never read"
    assert err["d.jpg"] == "image is 1.4 GiB (1,500,000,000 bytes), over the 64 MiB image cap; refused, not read"
    assert res.exit_code == 1 and "answered 1 of 5" in res.stderr
    assert f"error: {folder / 'd.jpg'}: image is 1.4 GiB" in res.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_evaluate_counts_fifo_and_device_images_as_unreadable(demo_bundle, im2gps_like, tmp_path, kind):
    meta, images, known = im2gps_like
    name = known["image"][0]
    (images / name).unlink()
    if kind == "fifo":
        os.mkfifo(images / name)
    else:
        (images / name).symlink_to("/dev/zero")
    out = tmp_path / "out"
    r, res = evaluate_json("--model", demo_bundle, "--meta", meta, "--images", images, "--out", out,
                           "--max-bad-fraction", 0.5)
    assert res.exit_code == 0, res.stderr
    assert (r["n_evaluated"], r["n_unreadable_images"], r["n_missing_images"]) == (5, 1, 1)
    skipped = pd.read_csv(out / "skipped.csv", dtype=str, keep_default_na=False)
    (row,) = skipped[skipped["kind"] == "unreadable_image"].itertuples()
    expect = "fifo" if kind == "fifo" else "character device"
    assert (row.image, row.reason) == (name, f"not a regular file ({expect}); refused, never read")
