"""The notebooks run top to bottom on real pipeline output, and are committed without outputs.

One module fixture runs the real Prefect flow on a tiny embedded dataset, tracked in a temp
sqlite MLflow store (as tests/flows/test_pipeline.py does), then executes each notebook with
nbclient, pointed at that run by the notebooks' environment variables. The kernel is ipykernel's
own spec for the interpreter running the tests (no kernelspec file is read, so a user-level
``python3`` kernel of another Python cannot be picked up), and its connection file and IPython
folder live in the temp folder: nothing outside it is written.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = ("01_data_exploration.ipynb", "02_hierarchy_qc.ipynb", "03_model_inspection.ipynb")
EXPERIMENT = "notebooks"
N_TRAIN, N_TEST = 1200, 150


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tracking_store, prefect_harness):
    """The whole flow once: demo data with one bad row, ingest .. evaluate, MLflow in a temp folder."""
    from mlflow.tracking import MlflowClient

    from flows.params import PipelineConfig
    from flows.pipeline import pipeline
    from geodata.demo.build import build_demo_dataset

    root = tmp_path_factory.mktemp("notebooks")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking_store(tracking_uri):
        # Created here so that the artifacts go to the temp folder, not the project's mlartifacts/.
        MlflowClient().create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
        build_demo_dataset(root / "data", n_train=N_TRAIN, n_test=N_TEST, seed=3)
        with open(root / "data" / "train.csv", "a") as f:  # one row to quarantine (latitude out of range)
            f.write("123456789," + "95.5,10.0" + "," * 29 + "\n")
        cfg = PipelineConfig.model_validate({
            "data_dir": str(root / "data"), "work_dir": str(root / "work"), "experiment": EXPERIMENT,
            "features": {"num_workers": 0}, "model": {"dim": 16, "hidden": 64},
            "train": {"epochs": 2, "batch_size": 128, "warmup_steps": 5},
        })
        with prefect_harness(root / "results"):
            result = pipeline(cfg)
        yield {"root": root, "work_dir": root / "work", "tracking_uri": tracking_uri, **result}


def _files(*folders: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for d in folders for p in d.rglob("*") if p.is_file()}


def execute(path: Path, cwd: Path, env: dict[str, str], timeout_s: int = 120):
    """Run a notebook top to bottom in a fresh kernel of this interpreter; returns the executed notebook."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # kernel_dirs=[]: only ipykernel's native "python3" spec, i.e. sys.executable -m ipykernel_launcher.
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]),
                            connection_file=str(cwd / f"kernel-{path.stem}.json"))
    assert km.kernel_spec.argv[0] == sys.executable
    cwd.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(nb, km=km, timeout=timeout_s, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env, cleanup_kc=True)  # cleanup_kc: shut the kernel down, though the client does not own km
    return nb


@pytest.fixture(scope="module")
def kernel_env(pipeline_run) -> dict[str, str]:
    """The notebooks' environment: this one, pointed at the pipeline run."""
    root = pipeline_run["root"]
    return {**os.environ, "HIERLOC_NB_WORK_DIR": str(pipeline_run["work_dir"]), "HIERLOC_NB_EXPERIMENT": EXPERIMENT,
            "MLFLOW_TRACKING_URI": pipeline_run["tracking_uri"], "IPYTHONDIR": str(root / "ipython")}


@pytest.fixture(scope="module")
def executed(pipeline_run, kernel_env):
    """Each notebook, executed against the pipeline run; also checks that none of them wrote anything."""
    root = pipeline_run["root"]
    before = _files(pipeline_run["work_dir"], root / "artifacts")
    out = {name: execute(NOTEBOOK_DIR / name, root, kernel_env) for name in NOTEBOOKS}
    assert _files(pipeline_run["work_dir"], root / "artifacts") == before, "a notebook wrote into the run's folders"
    return out


def cell_outputs(nb, tag: str) -> list:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected, found {len(cells)}"
    return cells[0].outputs


def text(outputs: list) -> str:
    """Streams and text/plain results of a cell, joined."""
    parts = [o.get("text", "") for o in outputs if o.output_type == "stream"]
    parts += [o.data["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    return "\n".join(parts)


def images(outputs: list, mime: str = "image/png") -> int:
    return sum(mime in o.get("data", {}) for o in outputs)


def test_data_exploration_shows_counts_quarantine_labels_and_map(executed):
    nb = executed["01_data_exploration.ipynb"]
    assert "splits ['train', 'test']" in text(cell_outputs(nb, "load"))
    counts = text(cell_outputs(nb, "row-counts"))
    # csv rows, kept, quarantined for each split; the manifest holds every kept row
    assert re.search(rf"^train\s+{N_TRAIN + 1}\s+{N_TRAIN}\s+1\s", counts, re.M), counts
    assert re.search(rf"^test\s+{N_TEST}\s+{N_TEST}\s+0\s", counts, re.M), counts
    reasons = text(cell_outputs(nb, "quarantine-reasons"))
    assert "1 quarantined rows" in reasons and re.search(r"^latitude_out_of_range\s+1\s+0$", reasons, re.M), reasons
    assert re.search(r"^image_corrupt\s+0\s+0$", reasons, re.M)  # every known reason is listed
    assert "countries; the top 15 hold" in text(cell_outputs(nb, "top-countries"))
    missing = text(cell_outputs(nb, "missing-labels"))
    assert re.search(r"^sub-region\s+\d+\.\d\s+\d+\.\d$", missing, re.M) and re.search(r"^country\s+0\.0\s+0\.0$", missing, re.M)
    assert images(cell_outputs(nb, "locations-map")) == 1


def test_hierarchy_qc_agrees_with_the_stage_report(executed, pipeline_run):
    import json

    nb = executed["02_hierarchy_qc.ipynb"]
    report = json.loads((pipeline_run["work_dir"] / "hierarchy" / "hierarchy_report.json").read_text())
    assert "the table is a tree" in text(cell_outputs(nb, "load"))
    per_level = text(cell_outputs(nb, "entities-per-level"))
    for level, n in report["entities"].items():  # counted from the table, and as reported: the same
        assert re.search(rf"^{level}\s+{n}\s.*\s{n}$", per_level, re.M), (level, n, per_level)
    fan_out = text(cell_outputs(nb, "fan-out"))
    for level in ("country", "region", "subregion"):  # every parent has children
        assert re.search(rf"^{level}\s.*\s0$", fan_out, re.M), fan_out
    assert f"report: {report['placeholder_subregions']}" in text(cell_outputs(nb, "placeholders"))
    unassigned = text(cell_outputs(nb, "unassigned"))
    assert "orphans: 0" in unassigned and re.search(r"^\s*train\s+test$", unassigned, re.M)
    assert "osv5m" in text(cell_outputs(nb, "labeler-counts"))
    assert images(cell_outputs(nb, "entity-map")) == 1


def test_model_inspection_reads_the_run_from_mlflow(executed, pipeline_run):
    nb = executed["03_model_inspection.ipynb"]
    assert EXPERIMENT in text(cell_outputs(nb, "parameters"))
    assert f"pipeline run {pipeline_run['parent_run_id']} (hierloc)" in text(cell_outputs(nb, "load"))
    runs = text(cell_outputs(nb, "runs"))
    assert pipeline_run["parent_run_id"] in runs
    for stage in ("pipeline", "ingest", "hierarchy", "features", "train", "evaluate"):
        assert re.search(rf"^{stage}\s+[0-9a-f]{{32}}\s+FINISHED\s", runs, re.M), (stage, runs)
    metrics = text(cell_outputs(nb, "key-metrics"))
    assert re.search(rf"^\s+test_n_kept\s+{N_TEST}$", metrics, re.M), metrics
    geoscore = pipeline_run["metrics"]["geoscore"]
    assert re.search(rf"^\s+geoscore\s+{float(f'{geoscore:.5g}')}$", metrics, re.M), (geoscore, metrics)
    assert re.search(r"^city\s+[0-9.]+\s+[0-9.]+", text(cell_outputs(nb, "level-metrics")), re.M)
    figures = cell_outputs(nb, "figures")
    assert images(figures) == 5
    assert "['error_map.png', 'level_accuracy.png', 'poincare_disk.png'" in text(figures)
    predict = text(cell_outputs(nb, "predict"))
    sample = Path(os.environ.get("HIERLOC_OSV5M_SAMPLE", "/nonexistent"))
    if sorted((sample / "images").glob("*.jpg")):
        assert images(cell_outputs(nb, "predict"), "image/jpeg") == 1  # the photo
        assert re.search(r"^country_key\s+[A-Z]{2}$", predict, re.M) and re.search(r"^error_km\s+[0-9.]+$", predict, re.M)
        assert images(cell_outputs(nb, "candidates-map")) == 1
    else:
        assert "skipped: set HIERLOC_OSV5M_SAMPLE" in predict


def test_model_inspection_without_the_sample_skips_the_photo(pipeline_run, kernel_env):
    env = {k: v for k, v in kernel_env.items() if k != "HIERLOC_OSV5M_SAMPLE"}
    nb = execute(NOTEBOOK_DIR / "03_model_inspection.ipynb", pipeline_run["root"], env)
    assert "skipped: set HIERLOC_OSV5M_SAMPLE" in text(cell_outputs(nb, "predict"))
    assert cell_outputs(nb, "candidates-map") == []
    assert images(cell_outputs(nb, "figures")) == 5


def test_a_missing_work_folder_says_what_to_do(tmp_path):
    from nbclient.exceptions import CellExecutionError

    env = {**os.environ, "HIERLOC_NB_WORK_DIR": str(tmp_path / "no-work"), "IPYTHONDIR": str(tmp_path / "ipython")}
    for name in ("01_data_exploration.ipynb", "02_hierarchy_qc.ipynb"):
        with pytest.raises(CellExecutionError, match=r"FileNotFoundError.*is missing: run `make demo`"):
            execute(NOTEBOOK_DIR / name, tmp_path, env)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_are_stripped(name):
    """No outputs, execution counts or widget state in git; the parameters cell is the first code cell."""
    import nbformat

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}: clear the outputs before committing"
    assert all("execution" not in c.metadata for c in code), f"{name}: cell timing metadata left in"
    assert "widgets" not in nb.metadata
    assert "parameters" in code[0].metadata.get("tags", [])


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
