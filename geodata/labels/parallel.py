"""Run a table function over Parquet partitions with Dask: locally, or on a real cluster.

The pattern DATA.md measured to pay off on a small machine: the driver writes the
points once as Parquet partitions, each Dask worker reads its own partition from disk
(shipping frames from the client eats the gain), the heavy shared state (polygons, a
places tree) is written once beside the partitions and loaded once per worker process
(faster than ``client.scatter`` for a large object), and each task
writes its result partition atomically. The driver then reads the results back in
partition order, so the output rows line up with the input rows.

``scheduler``:
- ``None`` / ``"local"``: a ``distributed.LocalCluster`` of ``n_workers`` processes (one
  thread each), started for the call and closed after it;
- ``"sync"``: no Dask at all, partitions run one after the other in this process
  (small inputs, debugging, and the reference the parallel runs are tested against);
- ``"tcp://host:8786"`` (any address): an existing cluster (Kubernetes, HPC, ...). Its
  workers must see ``work_dir`` (a shared filesystem) and have hierloc installed.
The environment variable ``HIERLOC_DASK_SCHEDULER`` sets the default.

``runner``: hand the partitions to someone else's executor instead (flows/tasks.py
passes one that runs each partition as a Prefect task on the flow's DaskTaskRunner):
``runner(call, arglist)`` must run ``call(*args)`` for every args tuple and return when
all are done. The partition files and the payload folder are the same as above.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geodata.atomic import write_parquet_atomic
from geodata.labels.payload import load_payload, save_payload
from geodata.progress import Progress

log = logging.getLogger(__name__)

#: Inputs smaller than this many rows run in-process: a cluster costs seconds to start.
MIN_ROWS_FOR_CLUSTER = 200_000
#: Rows per partition at most (the polygon labeler handles up to 1M points per point tree).
ROWS_PER_PARTITION = 1_000_000

PartitionFn = Callable[[pd.DataFrame, Any], pd.DataFrame]
PartitionRunner = Callable[[Callable[..., int], list[tuple]], None]


#: Shared state loaded by this worker process, by file: read once, reused by every task.
_PAYLOADS: dict[str, Any] = {}


def _load_payload(path: str) -> Any:
    """The payload folder's object (geodata.labels.payload: plain files, nothing unpickled), once per process."""
    if path not in _PAYLOADS:
        _PAYLOADS.clear()  # one payload per run: do not keep the last run's in memory
        _PAYLOADS[path] = load_payload(path)
    return _PAYLOADS[path]


def _run_partition(fn: PartitionFn, in_path: str, out_path: str, payload: Any, payload_file: str | None = None) -> int:
    """One task: read a partition, apply ``fn``, write its result atomically. Returns rows."""
    if payload_file is not None:
        payload = _load_payload(payload_file)
    df = pd.read_parquet(in_path)
    out = fn(df, payload)
    if len(out) != len(df):
        raise ValueError(f"{in_path}: the partition function returned {len(out)} rows for {len(df)}")
    write_parquet_atomic(pa.Table.from_pandas(out, preserve_index=False), Path(out_path))
    return len(out)


def default_scheduler() -> str | None:
    return os.environ.get("HIERLOC_DASK_SCHEDULER") or None


def _plan(n_rows: int, scheduler: str | None, n_partitions: int | None, n_workers: int, min_rows_for_cluster: int,
          runner: PartitionRunner | None) -> tuple[str | None, int]:
    """(scheduler, number of partitions) of a map_partitions run: "runner" when a runner is given,
    "sync" for a small input without a scheduler; else a multiple of the workers' partitions."""
    scheduler = scheduler if scheduler is not None else default_scheduler()
    if runner is not None:
        scheduler = "runner"
    elif scheduler is None and n_rows < min_rows_for_cluster:
        scheduler = "sync"
    if n_partitions is None and scheduler != "sync":  # a multiple of the workers: no lone last round
        rounds = max(2, -(-n_rows // (ROWS_PER_PARTITION * n_workers)))
        n_partitions = rounds * n_workers
    n_parts = n_partitions or 1
    return scheduler, max(1, min(n_parts, n_rows or 1))


def _write_partitions(frame: pd.DataFrame, n_parts: int, root: Path) -> tuple[list[str], list[str]]:
    """``frame`` cut into ``n_parts`` consecutive Parquet files in ``root``: their paths, and the
    paths their results go to."""
    bounds = [round(i * len(frame) / n_parts) for i in range(n_parts + 1)]
    ins, outs = [], []
    for i in range(n_parts):
        part = frame.iloc[bounds[i] : bounds[i + 1]]
        in_path, out_path = root / f"in-{i:05d}.parquet", root / f"out-{i:05d}.parquet"
        write_parquet_atomic(pa.Table.from_pandas(part, preserve_index=False), in_path)
        ins.append(str(in_path))
        outs.append(str(out_path))
    return ins, outs


def map_partitions(
    frame: pd.DataFrame,
    fn: PartitionFn,
    payload: Any = None,
    *,
    scheduler: str | None = None,
    n_partitions: int | None = None,
    n_workers: int = 2,
    work_dir: Path | None = None,
    min_rows_for_cluster: int = MIN_ROWS_FOR_CLUSTER,
    runner: PartitionRunner | None = None,
) -> pd.DataFrame:
    """``fn(partition, payload)`` over row partitions of ``frame``; the results concatenated
    in the input's row order (RangeIndex). ``fn`` must return one row per input row and be
    importable by the workers (a module-level function); ``payload`` is shipped to workers as
    plain files (geodata.labels.payload: numbers, strings, containers, arrays, DataFrames, labelers).
    """
    scheduler, n_parts = _plan(len(frame), scheduler, n_partitions, n_workers, min_rows_for_cluster, runner)
    if work_dir is None and scheduler not in ("sync", "local", "runner", None):
        raise ValueError(f"scheduler {scheduler!r} is a remote cluster: pass work_dir, a folder its workers can read")
    root = Path(tempfile.mkdtemp(prefix="hierloc-parts-")) if work_dir is None else Path(work_dir) / f"run-{uuid.uuid4().hex[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        ins, outs = _write_partitions(frame, n_parts, root)
        # rows of the finished partitions (geodata.progress); a runner's tasks show in its own UI
        name = getattr(fn, "__name__", "the function")
        with Progress(len(frame), f"{name} over {n_parts} partitions", unit="rows", logger=log) as bar:
            if scheduler == "sync":
                for a, b in zip(ins, outs):
                    bar.update(_run_partition(fn, a, b, payload))
            elif runner is not None:
                payload_file = _write_payload(payload, ins[0])
                runner(_run_partition, [(fn, a, b, None, payload_file) for a, b in zip(ins, outs)])
            else:
                _run_on_dask(fn, ins, outs, payload, scheduler, n_workers, bar)
        # One Arrow table, converted once (pyarrow reads the files on its threads): no pandas concat copy.
        result = pa.concat_tables([pq.read_table(p) for p in outs]).to_pandas()
        log.info("%d rows in %d partitions on %s in %.1f s", len(frame), n_parts, scheduler or "a LocalCluster",
                 time.perf_counter() - t0)
        return result
    finally:  # this run's own folder (a unique name, also under a given work_dir): nothing left behind
        shutil.rmtree(root, ignore_errors=True)


def _write_payload(payload: Any, first_partition: str) -> str | None:
    """The shared state as a folder of plain files beside the partitions (geodata.labels.payload: no
    pickle, so a file planted in a shared work folder cannot run code in a worker)."""
    if payload is None:
        return None
    return str(save_payload(payload, Path(first_partition).with_name("payload")))


def _run_on_dask(fn: PartitionFn, ins: list[str], outs: list[str], payload: Any, scheduler: str | None,
                 n_workers: int, bar: Progress) -> None:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler in (None, "local"):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        # The shared state travels once, as files beside the partitions: each worker process
        # loads it on its first task and keeps it (client.scatter of a 170 MB labeler took
        # 9 s on 2 local workers; a pickle file cost 0.5 s to write and 0.6 s to read, and the
        # plain files of geodata.labels.payload, which cannot run code when read, cost about the same).
        payload_file = _write_payload(payload, ins[0])
        n = len(ins)
        futures = client.map(_run_partition, [fn] * n, ins, outs, [None] * n, [payload_file] * n, pure=False)
        for done in as_completed(futures):
            bar.update(done.result())  # a failed partition raises here
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
