"""benchmarks/gpu.py: the reduced run end to end (its JSON and table), a failing section that does
not stop the others, exact retrieval against brute force, the chip peak table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402  (puts benchmarks/ on sys.path for its own modules)
from gpu_search import exact_topk  # noqa: E402
from gpu_train import peak_bf16_tflops  # noqa: E402


def test_quick_beam_and_train_write_the_json_and_the_table(tmp_path):
    """The reduced run (~30 s). One torch thread: on a shared 2-core machine two OpenMP threads
    mostly wait for each other (measured: 26 s with one, 93 s with two under a load of 3.5)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--sections", "beam", "train",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # see below
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"json: {out / 'gpu.json'}"
    report = json.loads((out / "gpu.json").read_text())
    meta = report["meta"]
    assert meta["reduced"] and meta["quick"] and meta["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert list(report["sections"]) == ["beam", "train"]
    assert [p.name for p in out.iterdir()] == ["gpu.json"]  # run folders live in the system's temp

    beam = report["sections"]["beam"]
    assert beam["status"] == "ok" and beam["errors"] == {}
    assert beam["entities"] == sum(meta["sizes"]["beam_levels"]) and beam["queries"] == meta["sizes"]["beam_queries"]
    assert beam["torch"]["qps"] > 0 and beam["torch"]["device"] == meta["device"]
    assert beam["faiss"]["qps"] > 0 and beam["faiss"]["threads"] == os.cpu_count()
    assert beam["top1_agreement"] >= 0.99  # both rank by the same inner products, re-scored in float64
    ret = beam["retrieval"]
    assert ret["n"] == meta["sizes"]["retrieval_n"] and ret["dim"] == 128
    assert ret["fp32_qps"] > 0 and ret["bf16_qps"] > 0 and 0.9 <= ret["bf16_top1_agreement"] <= 1

    train = report["sections"]["train"]
    assert train["status"] == "ok" and train["errors"] == {}
    assert train["entities"] == sum(meta["sizes"]["train_levels"]) and train["d_img"] == meta["sizes"]["d_img"]
    configs = {(c["batch"], c["refresh_every"]): c for c in train["configs"]}
    assert set(configs) == {(b, k) for b in meta["sizes"]["batches"] for k in meta["sizes"]["refresh"]}
    for (b, k), c in configs.items():
        assert c["steps_per_s"] > 0 and c["images_per_s"] == pytest.approx(c["steps_per_s"] * b)
        assert c["timed_steps"] == c["warmup_steps"] * meta["sizes"]["intervals"]  # the first interval is not timed
        assert c["warmup_steps"] % k == 0 and c["flops_per_step"] > 0
        assert c["tflop_s"] == pytest.approx(c["flops_per_step"] * c["steps_per_s"] / 1e12)
        assert np.isfinite(c["final_loss"])
    for b in meta["sizes"]["batches"]:  # k > 1 runs the table's forward and backward once per k steps
        assert configs[(b, 4)]["flops_per_step"] < 0.6 * configs[(b, 1)]["flops_per_step"]
    assert configs[(256, 1)]["flops_per_step"] > configs[(16, 1)]["flops_per_step"]
    table = proc.stdout[proc.stdout.index("| section | measurement | figure |"):]
    # host syncs between logging points, per k (counted on any device): none
    assert {k: h["host_syncs"] for k, h in train["host_syncs"].items()} == {"k=1": 0, "k=4": 0}
    assert table.count("\n| beam |") == 5 and table.count("\n| train |") == 4 + 2 and "FAILED" not in table


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    def boom(*args):
        raise RuntimeError("out of memory, say")

    def missing(*args):
        raise gpu.Skipped("nothing to run")

    monkeypatch.setattr(gpu, "RUNNERS", {"beam": boom, "train": boom, "features": missing})
    report = gpu.main(["--quick", "--sections", "beam", "features", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["sections"]["beam"]["status"] == "failed"
    assert saved["sections"]["beam"]["error"] == "RuntimeError: out of memory, say"
    assert "boom" in saved["sections"]["beam"]["traceback"]
    features = saved["sections"]["features"]
    assert (features["status"], features["reason"]) == ("skipped", "nothing to run")
    assert set(report["sections"]) == {"beam", "features"}
    out = capsys.readouterr().out
    assert "| beam | FAILED | RuntimeError: out of memory, say |" in out
    assert "| features | SKIPPED | nothing to run |" in out


def test_table_rows_give_the_figures_and_each_failed_part():
    report = {"meta": {}, "sections": {"train": {
        "status": "partial", "entities": 10, "d_img": 4, "device": "cpu", "peak_bf16_tflops": 989.0,
        "configs": [{"batch": 16, "refresh_every": 1, "steps_per_s": 2.0, "images_per_s": 32.0,
                     "flops_per_step": 5e11, "tflop_s": 1.0, "of_peak": 1 / 989}],
        "errors": {"batch 256, k=1": "OutOfMemoryError: CUDA out of memory"}}, "features": {
        "status": "ok", "precision": "bf16", "workers": 14, "errors": {},
        "models": [{"spec": "open_clip:ViT-L-14", "end_to_end_img_s": 1600.0, "encoder_only_img_s": 2000.0,
                    "loader_only_img_s": 2500.0, "end_to_end_vs_encoder": 0.8}]}}}
    rows = gpu.table_rows(report)
    assert rows[0][0] == "train" and rows[0][2].startswith("2.00 steps/s, 32 images/s; 500.0 GFLOP/step, 1.00 TFLOP/s")
    assert rows[0][2].endswith("= 0.1 % of 989")
    assert rows[1] == ("train", "FAILED: batch 256, k=1", "OutOfMemoryError: CUDA out of memory")
    assert rows[2] == ("features", "open_clip:ViT-L-14, bf16, 14 workers, end to end (encoder alone; loader alone)",
                       "1,600 images/s (2,000; 2,500): 80 % of the encoder")


@pytest.mark.slow
def test_features_section_runs_feature_rates_or_says_why_not(tmp_path):
    """With benchmarks/features.py's feature_rates: the reduced run's rates (ViT-B-32 on 64 sample
    photos, a minute on a CPU); without it: skipped, saying so."""
    import features as feature_bench

    entry = gpu.run_section("features", gpu.QUICK, torch.device("cpu"), None, tmp_path)
    if not hasattr(feature_bench, "feature_rates"):
        assert entry["status"] == "skipped" and "no feature_rates" in entry["reason"]
        return
    assert entry["status"] == "ok", entry
    # the new decoding, then the old full decode of the same model (the baseline), then JPEGs decoded on the device
    new, old, dev = entry["models"]
    assert (new["fast_decode"], old["fast_decode"]) == (True, False)
    assert (new["decoder"], old["decoder"], dev["decoder"]) == ("pil", "pil", "device")
    for row in (new, old, dev):
        assert row["spec"] == "open_clip:ViT-B-32" and entry["images"] == 64 and entry["precision"] == "fp32"
        assert min(row["end_to_end_img_s"], row["encoder_only_img_s"], row["loader_only_img_s"]) > 0
        assert row["end_to_end_vs_encoder"] == pytest.approx(row["end_to_end_img_s"] / row["encoder_only_img_s"])


@pytest.mark.parametrize("k,max_elems", [(1, 1 << 28), (1, 1000), (3, 700)])
def test_exact_topk_is_brute_force_over_chunks(k, max_elems):
    g = torch.Generator().manual_seed(0)
    db, q = torch.randn(3001, 16, generator=g), torch.randn(2100, 16, generator=g)  # 3 query blocks
    got = exact_topk(db, q, k, max_elems=max_elems)
    want = (q @ db.T).topk(k, dim=1).indices
    assert got.shape == (2100, k) and torch.equal(got, want)
    assert exact_topk(db, q[:0], k).shape == (0, k)


def test_peak_table():
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0 and peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("Some Future GPU") is None and peak_bf16_tflops(None) is None
