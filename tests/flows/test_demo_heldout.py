"""`hierloc demo-data --heldout-km` and the pipeline's demo_data.heldout_km (issue 16 section 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

SMALL = ["--n-train", "200", "--n-test", "20", "--seed", "2"]


def _tree(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_heldout_flag_builds_the_25_km_split(tmp_path):
    from flows.cli.main import app
    from geodata.demo.heldout import recorded_heldout_km

    res = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path / "h"), "--heldout", *SMALL],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout)
    assert stats["heldout_km"] == 25.0 and stats["min_test_train_km"] >= 25.0
    assert (stats["n_train"], stats["n_test"]) == (200, 20) and recorded_heldout_km(tmp_path / "h") == 25.0
    res = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path / "k"), "--heldout-km", "120", *SMALL],
                             catch_exceptions=False)
    assert res.exit_code == 0 and json.loads(res.stdout)["min_test_train_km"] >= 120.0


def test_cli_never_writes_the_heldout_split_into_the_default_demo_folder(tmp_path, monkeypatch):
    from flows.cli.main import app
    from geodata.demo.build import build_demo_dataset

    own = tmp_path / "demo"
    build_demo_dataset(own, n_train=30, n_test=10, seed=1)
    monkeypatch.setattr("flows.settings.DEMO_DATA_DIR", own)
    before = _tree(own)
    res = CliRunner().invoke(app, ["demo-data", "--out", str(own), "--heldout", *SMALL], catch_exceptions=False)
    assert res.exit_code == 2 and "is the default demo's" in res.stderr and "data/demo-heldout" in res.stderr
    assert _tree(own) == before


def test_pipeline_refuses_a_folder_whose_split_is_not_the_one_asked_for(tmp_path, monkeypatch):
    from flows.params import PipelineConfig
    from flows.stages.data_dir import DataDirError, check_heldout_data
    from flows.tasks import demo_data_task
    from geodata.demo.build import build_demo_dataset

    rand, held = tmp_path / "random", tmp_path / "held"
    build_demo_dataset(rand, n_train=30, n_test=10, seed=1)
    build_demo_dataset(held, n_train=60, n_test=10, seed=1, heldout_km=25.0)
    check_heldout_data(rand, None)  # no hold-out asked: any split will do
    check_heldout_data(held, 25)
    with pytest.raises(DataDirError, match=r"holds a held-out split at 25.0 km .*heldout_km is 30"):
        check_heldout_data(held, 30)

    def cfg(data_dir, **demo):
        return PipelineConfig.model_validate({"data_dir": str(data_dir), "work_dir": str(tmp_path / "w"),
                                              "demo_data": {"n_train": 30, "n_test": 10, **demo}})

    with pytest.raises(DataDirError, match=r"holds a random \(not held-out\) split .* --heldout-km 25.0"):
        demo_data_task.fn(cfg(rand, heldout_km=25))
    assert demo_data_task.fn(cfg(held, heldout_km=25)) == str(held)
    monkeypatch.setattr("flows.settings.DEMO_DATA_DIR", rand)
    with pytest.raises(DataDirError, match="is the default demo's"):
        demo_data_task.fn(cfg(rand, heldout_km=25))


def test_demo_data_params_bound_heldout_km():
    from pydantic import ValidationError

    from flows.params import DemoDataParams

    assert DemoDataParams().heldout_km is None and DemoDataParams(heldout_km=25).heldout_km == 25.0
    with pytest.raises(ValidationError, match="heldout_km"):
        DemoDataParams(heldout_km=-1)
