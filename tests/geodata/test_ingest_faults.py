"""Faulty and hostile ingest inputs: kills mid-commit, stray quotes, bad bytes, hostile shards.

Every row of the input is accounted for: kept, or quarantined with its file, line and reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from geodata.ingest import COMMIT_STEPS, ingest_osv5m
from tests.geodata.test_ingest import make_release, osv_row, read_quarantine

REPO = Path(__file__).resolve().parents[2]
TOTALS = ("n_in_total", "kept_total", "quarantined_total", "reasons_total", "manifest_digest", "n_pending",
          "n_parts")


def _outputs(out: Path) -> dict:
    """What an ingest folder publishes, in comparable form: manifests, quarantine, image index, report totals."""
    got: dict = {"quarantine": pq.read_table(out / "quarantine.parquet").to_pylist()}
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["ok"]
    for split in ("train", "test"):
        m = pq.read_table(out / "manifest" / f"{split}.parquet")
        got[f"manifest_{split}"] = sorted(m.to_pylist(), key=lambda r: r["line"])
        got[f"index_{split}"] = pq.read_table(out / "image_index" / f"{split}.parquet").to_pylist()
        got[f"report_{split}"] = {k: report["splits"][split][k] for k in TOTALS}
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not str(p.relative_to(out)).startswith(".runs"))
    got["files"] = names
    got["runs"] = len(list((out / ".runs").iterdir()))
    return got


def _ingest_killed_after(root: Path, out: Path, step: str) -> None:
    """Run the ingest in a child process that SIGKILLs itself after commit step `step`."""
    code = (f"from geodata.ingest import ingest_osv5m; "
            f"ingest_osv5m({str(root)!r}, {str(out)!r}, verify_images='exists', max_bad_fraction=1.0)")
    env = {**os.environ, "HIERLOC_INGEST_CRASH_AFTER": step, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_kill_at_each_commit_step_then_rerun_matches_one_shot(tmp_path: Path, step: str) -> None:
    # First ingest: 3 train rows (one bad); then train.csv grows by 2 rows (one without its image).
    rows = [osv_row(1), osv_row(2, lat="x"), osv_row(3), osv_row(4), osv_row(6)]
    images = {"train": {"1": b"", "3": b"", "4": b""}, "test": {"9": b""}}
    root = make_release(tmp_path / "osv", rows, [osv_row(9)], images=images)
    full = (root / "train.csv").read_bytes()
    head = b"".join(full.splitlines(True)[:4])

    def ingest(out: Path) -> None:
        ingest_osv5m(root, out, verify_images="exists", max_bad_fraction=1.0)

    (root / "train.csv").write_bytes(head)
    ingest(tmp_path / "one_head")
    ingest(tmp_path / "one_full")
    (root / "train.csv").write_bytes(full)
    ingest(tmp_path / "one_full")

    out = tmp_path / "out"
    (root / "train.csv").write_bytes(head)
    _ingest_killed_after(root, out, step)  # killed on the first ingest
    ingest(out)
    assert _outputs(out) == _outputs(tmp_path / "one_head")
    (root / "train.csv").write_bytes(full)
    _ingest_killed_after(root, out, step)  # killed on the appending one
    ingest(out)
    assert _outputs(out) == _outputs(tmp_path / "one_full")
