"""Scale rehearsal: the real pipeline flows over an OSV-5M-shaped dataset, per-stage time and memory.

1. Writes (or reuses: a marker holds the arguments) an OSV-5M-shaped dataset of ``--rows`` training
   and ``--test-rows`` test rows: train.csv / test.csv with the 32 release columns and the WebDataset
   copy with 768-d float16 ``street_clip`` features, no jpg (benchmarks/scale_data.py).
2. Runs the pipeline's flows (flows/pipeline.py) one stage at a time, as the deployments do, each in
   its own process (so each stage's peak memory is its own), chained by MLflow run ids
   (UpstreamRuns): ingest (layout webdataset, verify_images none) -> hierarchy (labeler osv5m) ->
   features (precomputed:street_clip) -> train (train.max_steps budget) -> evaluate + register
   (hierloc-evaluate registers and gates). One local Prefect server and one sqlite MLflow store
   under ``--out`` serve them all; nothing reaches the network.
3. Peak RSS per stage: the stage process and its children, sampled every 0.2 s (psutil), and the
   kernel's ru_maxrss of the process (the larger is reported).
4. Checks nothing is lost, and fails loudly if something is: per split, rows in = manifest +
   quarantine (ingest report, manifest and quarantine files), rows in = rows written; every test
   row of the manifest has a prediction or is counted in n_dropped_no_features.

    python benchmarks/pipeline_scale.py --quick --out /tmp/scale           # 1M + 50k rows
    python benchmarks/pipeline_scale.py --out /tmp/scale-full              # 4.9M + 210,122 rows

Prints one table (per stage: wall s, rows/s, peak RSS GB; disk used), then, last,
``pipeline_scale: rows=<N> test_rows=<M> peak_rss_gb=<max over stages> wall_s=<total>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("ingest", "hierarchy", "features", "train", "evaluate")
GB = 1e9


def pipeline_config(out: Path, max_steps: int, batch_size: int) -> dict:
    """The PipelineConfig of the rehearsal (flows.params)."""
    return {
        "data_dir": str(out / "data"), "work_dir": str(out / "work"), "experiment": "pipeline-scale",
        "demo_data": {"build_if_missing": False},
        "ingest": {"layout": "webdataset", "verify_images": "none"},
        "hierarchy": {"labeler": "osv5m"},
        "features": {"backbone": "precomputed:street_clip", "num_workers": 0},
        "train": {"epochs": 1, "batch_size": batch_size, "max_steps": max_steps,
                  "warmup_steps": max(1, max_steps // 10), "device": "cpu"},
        "evaluate": {"beam_k": 10},
        "registry": {"enabled": True, "name": "pipeline-scale"},
    }


# --------------------------------------------------------------------------- one stage, in a child
def _child(stage: str, cfg_path: str, upstream: str, result: str) -> None:
    from flows import pipeline as p
    from flows.params import PipelineConfig, UpstreamRuns

    cfg = PipelineConfig.model_validate(json.loads(Path(cfg_path).read_text()))
    runs = UpstreamRuns(**json.loads(upstream))
    t0 = time.perf_counter()
    if stage == "ingest":
        out = p.ingest_flow(cfg)
    else:
        out = getattr(p, f"{stage}_flow")(cfg, runs)
    seconds = time.perf_counter() - t0
    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    Path(result).write_text(json.dumps({"out": out, "flow_seconds": seconds, "ru_maxrss_gb": kib * 1024 / GB},
                                       default=str))


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(stage: str, cfg_path: Path, upstream: dict, env: dict, log: Path) -> dict:
    """The stage's flow in a child process; wall s, peak RSS (sampled tree, and ru_maxrss), its outputs."""
    import psutil

    result = cfg_path.parent / f"{stage}.result.json"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, __file__, "--child", stage, str(cfg_path), json.dumps(upstream),
                                 str(result)], env=env, stdout=f, stderr=subprocess.STDOUT)
        peak, ps, done = 0, psutil.Process(proc.pid), threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.2):
                peak = max(peak, _tree_rss(ps))
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        rc = proc.wait()
        done.set()
        t.join()
    wall = time.perf_counter() - t0
    if rc != 0 or not result.exists():
        raise SystemExit(f"pipeline_scale: stage {stage} failed (exit {rc}); its log: {log}\n"
                         + log.read_text(errors="replace")[-4000:])
    res = json.loads(result.read_text())
    return {"stage": stage, "wall_s": wall, "flow_s": res["flow_seconds"],
            "peak_rss_gb": max(peak / GB, res["ru_maxrss_gb"]), "sampled_gb": peak / GB,
            "ru_maxrss_gb": res["ru_maxrss_gb"], "out": res["out"]}


# --------------------------------------------------------------------------- the checks
def reconcile(work: Path, rows: int, test_rows: int) -> dict:
    """Nothing lost: per split rows in = written = manifest + quarantine; every manifest test row
    has a prediction or a counted reason. Raises AssertionError naming the count that differs."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from flows.stages.files import manifest_path

    report = json.loads((work / "ingest" / "ingest_report.json").read_text())
    quarantine = work / "ingest" / "quarantine.parquet"
    q = pq.read_table(quarantine, columns=["split"]).column("split").to_pylist() if quarantine.exists() else []
    out = {}
    for split, written in (("train", rows), ("test", test_rows)):
        s = report["splits"][split]
        manifest = pads.dataset(manifest_path(work / "ingest", split)).count_rows()
        quarantined = sum(1 for x in q if x == split)
        facts = {"written": written, "n_in": s["n_in_total"], "manifest": manifest, "kept": s["kept_total"],
                 "quarantine_rows": quarantined, "quarantined": s["quarantined_total"]}
        assert s["n_in_total"] == written, f"{split}: {written} rows written, ingest read {s['n_in_total']}: {facts}"
        assert manifest == s["kept_total"] and quarantined == s["quarantined_total"], f"{split}: {facts}"
        assert manifest + quarantined == written, f"{split}: manifest + quarantine != rows in: {facts}"
        out[split] = facts
    metrics = json.loads((work / "evaluate" / "metrics.json").read_text())
    preds = pq.read_metadata(work / "evaluate" / "predictions.parquet").num_rows
    dropped = int(metrics["n_dropped_no_features"])
    assert preds + dropped == out["test"]["manifest"], (
        f"test: {out['test']['manifest']} manifest rows, {preds} predictions + {dropped} counted (no features)")
    out["evaluate"] = {"predictions": preds, "dropped_no_features": dropped}
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="training rows (default 4,900,000; --quick 1,000,000)")
    ap.add_argument("--test-rows", type=int, default=None, help="test rows (default 210,122; --quick 50,000)")
    ap.add_argument("--quick", action="store_true", help="--rows 1000000 --test-rows 50000")
    ap.add_argument("--out", type=Path, required=True, help="folder for the data, the work folder, MLflow and Prefect")
    ap.add_argument("--max-steps", type=int, default=20, help="train.max_steps (default 20)")
    ap.add_argument("--batch-size", type=int, default=256, help="train.batch_size (default 256)")
    ap.add_argument("--shard-size", type=int, default=10_000, help="samples per WebDataset tar shard")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from benchmarks.scale_data import generate
    from flows.services.manager import Services

    rows = args.rows or (1_000_000 if args.quick else 4_900_000)
    test_rows = args.test_rows or (50_000 if args.quick else 210_122)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    gen = generate(out / "data", rows, test_rows, seed=args.seed, shard_size=args.shard_size)
    print(f"data: {rows:,} + {test_rows:,} rows, {gen['bytes'] / GB:.2f} GB, "
          + ("reused" if gen["reused"] else f"generated in {gen['seconds']:.1f} s ({gen['rows_per_s']:,} rows/s)"),
          flush=True)

    import shutil
    for name in ("work", "prefect", "run", "mlflow.db", "mlartifacts"):  # a fresh run each time: no cached stages
        target = out / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    svc = Services(project_dir=ROOT, state_dir=out / "run", prefect_home=out / "prefect", mlflow_db=out / "mlflow.db",
                   prefect_port=_free_port())
    env = {**svc.env(), "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONPATH": str(ROOT),
           "HIERLOC_HOME": str(out)}
    cfg_path = out / "pipeline_config.json"
    cfg_path.write_text(json.dumps(pipeline_config(out, args.max_steps, args.batch_size), indent=2))
    results, upstream = [], {}
    t_server = time.perf_counter()
    svc.start_prefect()
    print(f"Prefect server up in {time.perf_counter() - t_server:.0f} s ({svc.prefect_api})", flush=True)
    try:
        for stage in STAGES:
            r = run_stage(stage, cfg_path, upstream, env, out / "stages.log")
            if stage != "evaluate":
                upstream[stage] = r["out"]["run_id"]
            results.append(r)
            print(f"  {stage}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    finally:
        svc.stop("prefect-server")
    checks = reconcile(out / "work", rows, test_rows)
    n = rows + test_rows
    train_samples = results[3]["out"]["steps"] * args.batch_size
    counted = {"ingest": n, "hierarchy": n, "features": n, "train": train_samples, "evaluate": test_rows}
    print("\n| stage | wall s | rows | rows/s | peak RSS GB (sampled / ru_maxrss) |")
    print("|---|---|---|---|---|")
    for r in results:
        name = "evaluate + register" if r["stage"] == "evaluate" else r["stage"]
        k = counted[r["stage"]]
        print(f"| {name} | {r['wall_s']:.1f} | {k:,} | {k / r['wall_s']:,.0f} | "
              f"{r['peak_rss_gb']:.2f} ({r['sampled_gb']:.2f} / {r['ru_maxrss_gb']:.2f}) |")
    disk = {"data": du(out / "data"), "work": du(out / "work"), "mlflow": du(out / "mlartifacts") + du(out / "mlflow.db")}
    print(f"\ndisk: data {disk['data'] / GB:.2f} GB, work {disk['work'] / GB:.2f} GB, "
          f"MLflow {disk['mlflow'] / GB:.2f} GB")
    print(f"train: {results[3]['out']['steps']} steps (budgeted: {results[3]['out'].get('budgeted')}) of "
          f"{args.batch_size}; reconciled: " + json.dumps(checks))
    peak = max(r["peak_rss_gb"] for r in results)
    wall = sum(r["wall_s"] for r in results)
    print(f"pipeline_scale: rows={rows} test_rows={test_rows} peak_rss_gb={peak:.2f} wall_s={wall:.1f}", flush=True)
    return {"results": results, "checks": checks, "disk": disk, "gen": gen}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one stage, started by run_stage
        _child(*sys.argv[2:6])
    else:
        main()
