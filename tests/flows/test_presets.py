"""The presets configs/paper.json and configs/fast.json: they validate through `hierloc run`, and the
paper's run goes end to end on the embedded demo with every field reaching the model, the loss and
the search.

The demo run swaps only what cannot exist offline: the image backbone's weights (`fixed:pixelstats`
instead of CLIP ViT-L/14 from a local weights file), the text tower's weights (the same ViT-L/14 text
tower, random-init), and the folders (a small embedded demo in tmp_path). What reached each part is
read back from what the stages saved and logged (model.pt, checkpoint.pt, the MLflow runs), never
from the preset itself.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {name: ROOT / "configs" / f"{name}.json" for name in ("paper", "fast")}


def _preset(name: str) -> dict:
    return json.loads(PRESETS[name].read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hierloc_run_validates_the_preset(name):
    res = CliRunner().invoke(app, ["run", "--config", str(PRESETS[name]), "--check"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    resolved = json.loads(res.stdout)

    def same(want, got, where=""):  # every field the preset sets is in the resolved config, unchanged
        if isinstance(want, dict):
            for k, v in want.items():
                same(v, got[k], f"{where}.{k}")
        else:
            assert got == want, where

    same(_preset(name), resolved)


def test_check_refuses_a_bad_preset_value_without_running(tmp_path):
    bad = _preset("paper")
    bad["train"]["batch_size"] = 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    res = CliRunner().invoke(app, ["run", "--config", str(path), "--check"], catch_exceptions=False)
    assert res.exit_code == 2 and "'train.batch_size'" in res.stderr and res.stdout == ""


def test_the_paper_preset_states_the_papers_settings():
    """HIERLOC.md sections 3-8: batch 16, lr 2e-4, 5 epochs, beam 10, CLIP ViT-L/14, Text_i and
    8-head attention on, d = 128, every entity a negative at every step."""
    p = _preset("paper")
    assert (p["train"]["batch_size"], p["train"]["lr"], p["train"]["epochs"]) == (16, 2e-4, 5)
    assert p["train"]["entity_refresh_every"] == 1 and p["evaluate"]["beam_k"] == 10
    assert p["evaluate"]["variant"] == "official" and p["evaluate"]["method"] == "hierloc"
    assert p["features"]["backbone"] == "open_clip:ViT-L-14-quickgelu" and p["text"]["spec"] == "open_clip:ViT-L-14-quickgelu"
    assert p["text"]["enabled"] and p["model"]["attention"] and p["model"]["attn_heads"] == 8
    assert p["model"]["dim"] == 128 and p["model"]["geometry"] == "lorentz"
    assert p["demo_data"]["build_if_missing"] is False  # a missing release folder is an error, never a demo


def test_fast_differs_from_paper_only_where_its_notes_say():
    """configs/fast.md names each field fast.json changes; nothing else may differ."""
    paper, fast = _preset("paper"), _preset("fast")
    notes = (ROOT / "configs" / "fast.md").read_text()

    def diff(a, b, where=""):
        if isinstance(a, dict):
            return [d for k in a.keys() | b.keys() for d in diff(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))]
        return [] if a == b else [where]

    changed = diff(paper, fast)
    assert changed and all(f"`{c}`" in notes for c in changed), (changed, "configs/fast.md must name each")


def test_every_preset_field_has_its_source_in_the_notes():
    """configs/paper.md gives each field of paper.json its source (the paper, or our choice)."""
    notes = (ROOT / "configs" / "paper.md").read_text()

    def leaves(d, where=""):
        for k, v in d.items():
            yield from leaves(v, f"{where}{k}.") if isinstance(v, dict) else [f"{where}{k}"]

    missing = [f for f in leaves(_preset("paper")) if f"`{f}`" not in notes]
    assert not missing, f"configs/paper.md does not name {missing}"


# --- the paper's run on the embedded demo (slow: `make test-all`) ----------------------------------------
N_TRAIN, N_TEST = 400, 60


@pytest.fixture(scope="module")
def paper_demo_run(tmp_path_factory, tracking_store, prefect_harness):
    from flows.params import PipelineConfig
    from flows.pipeline import pipeline
    from geodata.demo.build import build_demo_dataset

    root = tmp_path_factory.mktemp("paper_demo")
    build_demo_dataset(root / "data", n_train=N_TRAIN, n_test=N_TEST, seed=11)
    want = _preset("paper")
    swapped = copy.deepcopy(want)
    swapped.update(data_dir=str(root / "data"), work_dir=str(root / "work"))
    swapped["features"].update(backbone="fixed:pixelstats", pretrained=None)  # no image weights offline
    swapped["text"].update(pretrained=None)  # the same text tower, random-init: no text weights offline
    cfg = PipelineConfig.model_validate(swapped)
    with tracking_store(f"sqlite:///{root / 'mlflow.db'}"), prefect_harness(root / "results"):
        result = pipeline(cfg)
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name(want["experiment"]).experiment_id])
        stages = {r.data.tags.get("stage"): r for r in runs
                  if r.data.tags.get("mlflow.parentRunId") == result["parent_run_id"]}
        table = json.loads(Path(client.download_artifacts(stages["evaluate"].info.run_id, "paper_table.json",
                                                          str(root / "dl"))).read_text())
        history = client.get_metric_history(stages["train"].info.run_id, "lr")
    return want, result, stages, table, history


@pytest.mark.slow  # the ViT-L/14 text tower and attention at batch 16: ~2.5 CPU-minutes
def test_paper_preset_model_is_what_the_preset_says(paper_demo_run):
    from hierloc.model.io import load_model
    from hierloc.model.location import SphericalHarmonicsEncoder

    want, result, *_ = paper_demo_run
    m = want["model"]
    from hierloc.model.model import ModelConfig

    model = load_model(result["model_path"])  # the trained model, as saved by the train stage
    assert model.cfg == ModelConfig(**m)
    # the structure, not only the saved config: attention over 4 levels with 8 heads, Text_i from the
    # ViT-L/14 text tower (768-d), spherical harmonics of degree 10, d = 128 points in R^129
    assert model.attn is not None and len(model.attn.attn) == 4 and model.attn.n_keys == m["attn_keys"]
    assert all(a.num_heads == m["attn_heads"] for a in model.attn.attn)
    assert model.entity_text_feat is not None and model.entity_text_feat.shape == (sum(model.level_sizes), 768)
    assert any(isinstance(mod, SphericalHarmonicsEncoder) and mod.degree == m["sh_degree"] for mod in model.modules())
    feats = model.norm.mean.new_zeros((2, model.norm.mean.shape[0]))
    assert model.encode_images(feats).shape == (2, m["dim"] + 1)


@pytest.mark.slow  # the ViT-L/14 text tower and attention at batch 16: ~2.5 CPU-minutes
def test_paper_preset_training_is_what_the_preset_says(paper_demo_run):
    from hierloc.digest import digest_of
    from hierloc.model.io import load_model, load_plain
    from hierloc.model.model import ModelConfig
    from hierloc.train.loop import TrainConfig

    want, result, stages, _, history = paper_demo_run
    t = want["train"]
    train_run = stages["train"].data
    n = int(train_run.metrics["n_train"])
    ck = load_plain(Path(result["train"]["run_dir"]) / "checkpoint.pt", what="checkpoint", max_bytes=1 << 30)
    sizes = load_model(result["model_path"]).level_sizes
    # the loop keys its checkpoint on the exact configs it was given: equal digests, equal TrainConfig
    loop_saw = [ModelConfig(**want["model"]).to_dict(), TrainConfig(**t).to_dict(), {"n": n, "levels": sizes}]
    assert ck["digest"] == digest_of(loop_saw)
    # and what it did: 5 epochs of batch 16, the learning rates it was given
    assert ck["epoch"] == t["epochs"] and ck["step"] == t["epochs"] * math.ceil(n / t["batch_size"])
    assert train_run.metrics["epochs_run"] == t["epochs"] and train_run.metrics["steps"] == ck["step"]
    assert {g["initial_lr"] for g in ck["opt"]["param_groups"]} == {t["lr"]}
    assert {g["initial_lr"] for g in ck["ropt"]["param_groups"]} == {t["riemannian_lr"]}
    assert {g["weight_decay"] for g in ck["opt"]["param_groups"]} == {t["weight_decay"], 0.0}
    assert ck["loss"]["betas"].tolist() == t["betas"]
    assert max(h.value for h in history) <= t["lr"] * (1 + 1e-6)  # warmup never passes the paper's lr


@pytest.mark.slow  # the ViT-L/14 text tower and attention at batch 16: ~2.5 CPU-minutes
def test_paper_preset_search_and_metrics_are_what_the_preset_says(paper_demo_run):
    want, result, stages, *_ = paper_demo_run
    ev = stages["evaluate"].data.metrics
    assert ev["search_beam_k"] == want["evaluate"]["beam_k"]  # the width the beam search ran with
    assert ev["n"] == N_TEST and 0 < ev["geoscore"] <= 5000
    feats = stages["features"].data.params
    assert feats["backbone"] == "fixed:pixelstats" and feats["precision"] == want["features"]["precision"]
    assert stages["train"].data.params["text.spec"] == want["text"]["spec"]


@pytest.mark.slow  # the ViT-L/14 text tower and attention at batch 16: ~2.5 CPU-minutes
def test_the_evaluate_run_logs_the_paper_table_marked_not_comparable_on_the_demo(paper_demo_run):
    from flows.report.paper_table import PAPER_ROWS

    _, result, stages, table, _ = paper_demo_run
    rows = {r[0]: r for r in table["data"]}
    assert table["columns"][:7] == ["method", "GeoScore", "mean km", "country %", "region %", "subregion %", "city %"]
    assert rows["HierLoc, CLIP ViT-L/14"][1:7] == [3850, 1067, 80.1, 52.9, 39.0, 22.2]
    assert len(table["data"]) == len(PAPER_ROWS) + 1
    ours = table["data"][-1]
    m = result["metrics"]
    assert ours[1] == round(m["geoscore"]) and ours[3] == round(100 * m["acc_country"], 1)
    assert ours[-1].startswith("no: not OSV-5M: the embedded demo data")
    assert stages["evaluate"].data.tags["paper_comparable"] == ours[-1]
