"""Ingest an OSV-5M release into typed Parquet manifests, quarantining bad rows; incremental.

Inputs (DATA.md), detected per root (`layout="auto"`):

- "csv": `root/{split}.csv` (32 columns, `OSV5M_COLUMNS` order) and the photos under
  `root/images/{split}/` (zip or tar shards, or unzipped folders, any depth);
- "webdataset": tar shards `root/{split}/**/*.tar` of jpg + json + *.npy samples
  (geodata.ingest.webdataset); the .npy features go to `out_dir/features/<name>/`.

Outputs:

- `out_dir/manifest/{split}.parquet/part-*.parquet`: the kept rows, one part per run
  (`pd.read_parquet(out_dir / "manifest" / f"{split}.parquet")` reads them all);
  `MANIFEST_SCHEMA`: id int64, latitude/longitude float64, the other 29 columns as strings
  exactly as in the input (Namibia's "NA" and empty fields stay strings), plus split,
  line, image_container, image_member, image_offset, image_size.
- `out_dir/quarantine.parquet`: every rejected row of every run (`QUARANTINE_COLUMNS`),
  with the first reason that applies, in `REASONS` order.
- `out_dir/image_index/{split}.parquet`: every listed image (id, container, member,
  size_bytes, offset, refused), from zip central directories / tar headers.
- `out_dir/ingest_report.json`: `IngestReport`; `out_dir/ingest_state.json`: what is
  ingested (geodata.ingest.incremental).

One streaming pass per CSV (geodata.ingest.split): each pyarrow batch is judged
(geodata.ingest.validate: row checks, duplicate ids against all earlier rows as numpy, image
lookup in geodata.ingest.image_index and decoding) and its kept rows go straight to the manifest
part. Memory: one batch, the image index and a few int64 arrays per row; never a Python
object per row. This module plans a run, runs each split's pass and commits the result.

Incremental: a re-run parses only the CSV bytes appended since the last run (when the
earlier bytes still hash the same), lists only new or changed image shards, and re-checks
rows quarantined earlier as image_missing (kept aside in a pending table) against new
shards: found ones join the manifest. A CSV whose ingested bytes changed, a removed or
rewritten shard, or other settings make a full re-ingest of every split (the report says
why). A run with no new input is a no-op. Order guarantee: parts in run order, rows in
file order within a part, rows admitted late (their image came later) in the part of the
run that admitted them; sort by (split, line) for file order.

Crash safety: a run writes its tables under `.runs/run-N/`, moves its manifest parts into
place, then saves the state (the commit point) and only then publishes quarantine.parquet
and image_index/ and removes what the state no longer lists. A run killed before the
state is redone by the next run; one killed after it is finished by the next run (even a
no-op one publishes again). `crash_point` lets tests kill the process at each step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geodata.atomic import atomic_write_path, write_parquet_atomic, write_text_atomic
from geodata.ingest.image_index import ImageIndex, decode_checker, update_image_index
from geodata.ingest.image_listing import LISTING_SCHEMA
from geodata.ingest.image_store import ImageStore
from geodata.ingest.incremental import (
    IngestState,
    PartState,
    SplitState,
    csv_plan,
    drop_state,
    load_state,
    manifest_digest,
    orphan_parts,
    save_state,
)
from geodata.ingest.csv_read import (
    OSV5MFormatError,
    check_header,
    read_header,
    record_numbers,
    record_start_lines,
)
from geodata.ingest.split import PartWriter, SplitRun, ingest_csv_split, ingest_wds_split, wds_shard_plan
from geodata.ingest.quarantine import (
    AFTER_DUPLICATE_REASONS,
    QUARANTINE_COLUMNS,
    QUARANTINE_SCHEMA,
    REASON_CODE,
    REASON_FIELD,
    REASONS,
    empty_quarantine,
    sort_quarantine,
    summarise,
)
from geodata.ingest.validate import ID_REGEX, MANIFEST_SCHEMA, IdSet, row_reasons

__all__ = [
    "MANIFEST_SCHEMA", "QUARANTINE_COLUMNS", "QUARANTINE_SCHEMA", "REASONS", "REASON_CODE", "REASON_FIELD",
    "IngestError", "IngestReport", "OSV5MFormatError", "SplitReport", "check_header", "ingest_osv5m",
    "record_numbers", "record_start_lines", "row_reasons",
]

log = logging.getLogger(__name__)

VerifyImages = Literal["none", "exists", "decode"]
Layout = Literal["auto", "csv", "webdataset"]
_RUNS_DIR = ".runs"  # per-run pending / quarantine / image index; the state names the current one
COMMIT_STEPS = ("split", "run_tables", "parts", "state", "publish", "cleanup", "report")  # crash_point names
_ATOMIC_TMP = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # geodata.atomic's temp names


class IngestError(RuntimeError):
    """Too many rows of a split were quarantined (see the report and quarantine.parquet)."""


@dataclass
class SplitReport:
    """Counts and outputs of one split.

    This run: n_in = n_kept + n_quarantined (rows read this run); n_recovered rows
    quarantined earlier as image_missing were admitted because their image arrived.
    All runs: kept_total + quarantined_total = n_in_total; bad_fraction =
    quarantined_total / n_in_total (what max_bad_fraction is checked against, as for a
    one-shot ingest of the whole input). mode: "full", "append" or "unchanged".
    CSV lines read this run: n_lines = header (when read from the start) + n_blank_lines
    + n_lines_kept + n_lines_quarantined (a row spans one line, or two with a quoted line break).
    """

    split: str
    csv_path: str
    mode: str = "full"
    full_reason: str = ""
    n_in: int = 0
    n_kept: int = 0
    n_quarantined: int = 0
    n_recovered: int = 0
    n_in_total: int = 0
    kept_total: int = 0
    quarantined_total: int = 0
    bad_fraction: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    reasons_total: dict[str, int] = field(default_factory=dict)
    manifest_path: str | None = None
    manifest_digest: str = ""
    n_parts: int = 0
    bytes_parsed: int = 0
    line_numbers: Literal["physical", "record"] = "physical"
    n_lines: int = 0
    n_blank_lines: int = 0
    n_lines_kept: int = 0
    n_lines_quarantined: int = 0
    n_images_indexed: int = 0
    n_containers_listed: int = 0
    n_containers_reused: int = 0
    n_duplicate_images: int = 0
    duplicate_image_examples: list[str] = field(default_factory=list)
    n_pending: int = 0
    features: dict[str, int] = field(default_factory=dict)  # WebDataset: name -> D
    warning: str = ""  # e.g. the split has no rows at all (a header-only CSV)


@dataclass
class IngestReport:
    """What `ingest_osv5m` read, kept, quarantined and wrote. JSON-serialisable."""

    root: str
    out_dir: str
    verify_images: str
    max_bad_fraction: float
    layout: str = "csv"
    ok: bool = True
    error: str | None = None
    noop: bool = False
    splits: dict[str, SplitReport] = field(default_factory=dict)
    quarantine_path: str = ""
    report_path: str = ""
    state_path: str = ""
    image_index_dir: str = ""
    feature_dir: str = ""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (nested dataclasses expanded)."""
        return asdict(self)

    def to_json(self) -> str:
        """Indented JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# --------------------------------------------------------------------------- entry point


def _check_args(verify_images: str, max_bad_fraction: float, splits: tuple[str, ...], layout: str) -> None:
    """Raise ValueError for arguments out of their domain."""
    if verify_images not in ("none", "exists", "decode"):
        raise ValueError(f"verify_images={verify_images!r}; use 'none', 'exists' or 'decode'")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}; use a fraction in [0, 1]")
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits={splits!r}; give each split name once")
    if layout not in ("auto", "csv", "webdataset"):
        raise ValueError(f"layout={layout!r}; use 'auto', 'csv' or 'webdataset'")


def detect_layout(root: Path, splits: tuple[str, ...]) -> str:
    """'csv' when root/{split}.csv exists for the first split, 'webdataset' when root/{split}/ holds tars."""
    if (root / f"{splits[0]}.csv").exists():
        return "csv"
    if (root / splits[0]).is_dir() and any((root / splits[0]).rglob("*.tar")):
        return "webdataset"
    return "csv"  # the CSV path names the missing file


def _check_image_folders(root: Path, splits: tuple[str, ...]) -> None:
    """Fail early on a missing images/{split} folder, before streaming gigabytes of CSV."""
    for split in splits:
        if not (root / "images" / split).is_dir():
            raise FileNotFoundError(
                f"{root / 'images' / split} not found; expected the release's "
                f"images/{split}/NN.zip (or unzipped folders), or pass verify_images='none'"
            )


def _too_bad_message(report: IngestReport) -> str | None:
    """The IngestError message when some split exceeds max_bad_fraction, else None."""
    too_bad = [s for s in report.splits.values() if s.bad_fraction > report.max_bad_fraction]
    if not too_bad:
        return None
    return "; ".join(
        f"{s.split}: {s.quarantined_total} of {s.n_in_total} rows quarantined "
        f"({s.bad_fraction:.2%} > max_bad_fraction {report.max_bad_fraction:.2%}), "
        f"reasons {s.reasons_total}"
        for s in too_bad
    ) + f". See {report.quarantine_path}."


def _usable_state(state: IngestState | None, layout: str, verify_images: str, splits: tuple[str, ...],
                  out_dir: Path) -> tuple[IngestState | None, str]:
    """The previous state when this run can build on it, else (None, why not)."""
    if state is None:
        return None, "first ingest into this folder"
    if state.layout != layout:
        return None, f"layout changed ({state.layout} -> {layout})"
    if state.verify_images != verify_images:
        return None, f"verify_images changed ({state.verify_images} -> {verify_images})"
    if tuple(state.splits_order) != splits:
        return None, f"splits changed ({state.splits_order} -> {list(splits)})"
    for split, s in state.splits.items():
        part_dir = out_dir / "manifest" / f"{split}.parquet"
        missing = [p.name for p in s.parts if not (part_dir / p.name).is_file()]
        if missing:
            return None, f"manifest part {part_dir / missing[0]} is missing"
    if not (out_dir / _RUNS_DIR / f"run-{state.run:05d}").is_dir():
        return None, "the previous run's pending/quarantine tables are missing"
    return state, ""


def _run_dir(out_dir: Path, run: int) -> Path:
    return out_dir / _RUNS_DIR / f"run-{run:05d}"


def _read_or_empty(path: Path, schema: pa.Schema) -> pa.Table:
    return pq.read_table(path).cast(schema) if path.is_file() else schema.empty_table()


def _previous_index(out_dir: Path, state: IngestState, split: str) -> pa.Table:
    """The image index (LISTING_SCHEMA) of `split` as the last committed run left it."""
    return _read_or_empty(_run_dir(out_dir, state.run) / f"image_index_{split}.parquet", LISTING_SCHEMA)


def _seen_ids(out_dir: Path, state: IngestState, quarantine: pa.Table, pending: dict[str, pa.Table]) -> IdSet:
    """Every id that a new row would duplicate: kept, pending, and rejected after the duplicate check."""
    parts = [np.zeros(0, np.int64)]
    for split, s in state.splits.items():
        part_dir = out_dir / "manifest" / f"{split}.parquet"
        for p in s.parts:
            parts.append(pq.read_table(part_dir / p.name, columns=["id"])["id"].to_numpy())
        parts.append(pending[split]["id"].to_numpy())
    late = quarantine.filter(pc.is_in(quarantine["reason"], pa.array(list(AFTER_DUPLICATE_REASONS))))
    late_ids = late["id"].filter(pc.match_substring_regex(late["id"], ID_REGEX))
    parts.append(pc.cast(late_ids, pa.int64()).to_numpy())
    return IdSet(np.concatenate(parts))


def crash_point(step: str) -> None:
    """Test hook: SIGKILL this process after commit step `step` when $HIERLOC_INGEST_CRASH_AFTER names it.

    Steps, in order (`COMMIT_STEPS`): split (a split's rows read, nothing committed), run_tables,
    parts, state, publish, cleanup, report.
    """
    if os.environ.get("HIERLOC_INGEST_CRASH_AFTER") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Publish `src` at `dst` atomically (a hard link when possible); nothing to do when it already is `src`."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    with atomic_write_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def ingest_osv5m(
    root: Path,
    out_dir: Path,
    splits: tuple[str, ...] = ("train", "test"),
    verify_images: VerifyImages = "decode",
    max_bad_fraction: float = 0.05,
    *,
    decode_workers: int | None = None,
    layout: Layout = "auto",
    incremental: bool = True,
    features: tuple[str, ...] | None = None,
) -> IngestReport:
    """Validate an OSV-5M release (or only what was added since the last run) into `out_dir`.

    verify_images: "none" skips image lookup (CSV: image_* columns null, no images/ folder
    needed); "exists" quarantines rows without an image (`<id>.jpg` under
    root/images/{split}, zips/tars/folders at any depth; WebDataset: the sample's jpg);
    "decode" also decodes each image fully (threads: `decode_workers`, default the CPU
    count) and quarantines failures.

    Duplicate ids: within and across splits and runs, the first occurrence in `splits`
    order, then file order, is kept. Duplicates are looked for among rows that passed the
    id/latitude/longitude checks; image checks run after, so a first occurrence with a
    missing image still makes later copies duplicates.

    layout: "auto" (CSV when root/{split}.csv exists, else WebDataset tars), "csv" or
    "webdataset". incremental=False ignores what out_dir holds. features (WebDataset):
    the .npy feature names every sample must have; None = those of the first sample.

    Raises OSV5MFormatError (bad header / unreadable CSV), FileNotFoundError (missing
    input), UnsafeMemberError (an archive with escaping member names), IngestError when a
    split's quarantined fraction (over all runs) exceeds `max_bad_fraction`: then
    quarantine.parquet and ingest_report.json (ok = false) are written, but no manifest
    (manifests and state of all splits are removed: the next run starts from scratch).
    """
    t0 = time.perf_counter()
    root, out_dir, splits = Path(root), Path(out_dir), tuple(splits)
    _check_args(verify_images, max_bad_fraction, splits, layout)
    layout = detect_layout(root, splits) if layout == "auto" else layout
    if layout == "csv":
        for split in splits:
            if not (root / f"{split}.csv").is_file():
                raise FileNotFoundError(
                    f"{root / f'{split}.csv'} not found; point root at the OSV-5M release folder "
                    "(the one holding train.csv, test.csv and images/), or at the WebDataset copy"
                )
        if verify_images != "none":
            _check_image_folders(root, splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = IngestReport(
        root=str(root), out_dir=str(out_dir), verify_images=verify_images, max_bad_fraction=max_bad_fraction,
        layout=layout, quarantine_path=str(out_dir / "quarantine.parquet"),
        report_path=str(out_dir / "ingest_report.json"), state_path=str(out_dir / "ingest_state.json"),
        image_index_dir=str(out_dir / "image_index"), feature_dir=str(out_dir / "features"),
    )
    loaded = load_state(out_dir) if incremental else None
    state, why_full = _usable_state(loaded, layout, verify_images, splits, out_dir)
    if not incremental:
        why_full = "incremental=False"

    # Plan: what is new per split; anything but appends makes every split start over.
    plans: dict[str, Any] = {}
    wds_shards: dict[str, tuple[list[Path], dict[str, str]]] = {}
    images: dict[str, ImageIndex] = {}
    for attempt in range(2):
        plans, wds_shards, images = {}, {}, {}
        for split in splits:
            prev = state.splits.get(split) if state is not None else None
            if layout == "csv":
                csv_path = root / f"{split}.csv"
                if attempt == 0:  # fail early on a wrong header, before streaming any CSV
                    check_header(read_header(csv_path), csv_path)
                plan = csv_plan(csv_path, prev.csv if prev else None)
                if state is not None and plan.reason:
                    why_full = plan.reason
                plans[split] = plan
                if verify_images != "none":
                    previous = _previous_index(out_dir, state, split) if state is not None else None
                    images[split] = update_image_index(root, split, previous, prev.containers if prev else {})
                    if state is not None and images[split].full_reason:
                        why_full = images[split].full_reason
            else:
                new, fps, reason = wds_shard_plan(root, split, prev.shards if prev else {})
                if state is not None and reason:
                    why_full = reason
                wds_shards[split] = (new, fps)
        if state is not None and why_full:
            log.info("full re-ingest: %s", why_full)
            state = None
            continue
        break

    run_no = (state.run if state is not None else (loaded.run if loaded is not None else 0)) + 1
    prev_run_dir = _run_dir(out_dir, state.run) if state is not None else None
    old_quarantine = _read_or_empty(prev_run_dir / "quarantine.parquet", QUARANTINE_SCHEMA) if prev_run_dir else empty_quarantine()
    old_pending = {
        split: _read_or_empty(prev_run_dir / f"pending_{split}.parquet", MANIFEST_SCHEMA) if prev_run_dir
        else MANIFEST_SCHEMA.empty_table()
        for split in splits
    }

    nothing_new = state is not None and all(
        (plans[s].start == plans[s].end if layout == "csv" else not wds_shards[s][0]) for s in splits
    ) and not any(i.new_containers for i in images.values())
    if nothing_new:
        return _finish_noop(report, state, out_dir, old_quarantine, old_pending, t0)

    store = ImageStore(root)
    workers = decode_workers or os.cpu_count() or 1
    seen = _seen_ids(out_dir, state, old_quarantine, old_pending) if state is not None else IdSet()
    runs: dict[str, SplitRun] = {}
    dims: dict[str, int] = {}
    new_pending: dict[str, pa.Table] = {}
    listings: dict[str, list[pa.Table]] = {s: [] for s in splits}
    try:
        for split in splits:
            t_split = time.perf_counter()
            part_name = f"part-{run_no:05d}.parquet"
            srep = SplitReport(split=split, csv_path=str(root / f"{split}.csv") if layout == "csv" else str(root / split))
            srep.mode = "full" if state is None else "append"
            srep.full_reason = why_full if state is None else ""
            run = SplitRun(report=srep, writer=PartWriter(out_dir / "manifest" / f"{split}.parquet", part_name))
            runs[split] = run
            if state is None:
                path = out_dir / "manifest" / f"{split}.parquet"
                if path.is_file():  # an older single-file manifest: replaced by a folder of parts
                    path.unlink()
            if layout == "csv":
                checker = decode_checker(store, workers) if verify_images == "decode" else None
                new_pending[split] = ingest_csv_split(run, root, plans[split], seen, images.get(split), checker,
                                                      old_pending[split])
            else:
                new, fps = wds_shards[split]
                run.shards = fps
                ingest_wds_split(run, root, out_dir, new, seen, verify_images, store, workers, features, dims,
                                 listings[split])
                new_pending[split] = MANIFEST_SCHEMA.empty_table()
            log.info("%s: %d rows read in %.1f s", split, run.report.n_in, time.perf_counter() - t_split)
            crash_point("split")
    except BaseException:
        for r in runs.values():
            r.writer.discard()
        raise
    finally:
        store.close()
    return _commit(report, state, runs, splits, out_dir, run_no, layout, verify_images, old_quarantine,
                   new_pending, images, listings, t0)


def _split_quarantine(old: pa.Table, run: SplitRun, split: str) -> pa.Table:
    """All quarantine rows of a split after this run: earlier ones (less re-judged rows) + new ones."""
    mine = old.filter(pc.equal(old["split"], split))
    if run.resolved is not None and run.resolved.num_rows:
        gone = pa.table({"line": run.resolved["line"], "reason": pa.array(["image_missing"] * run.resolved.num_rows)})
        mine = mine.join(gone, ["line", "reason"], join_type="left anti")
    new = [t for t in [*run.quarantine, run.rejudged] if t is not None and t.num_rows]
    return sort_quarantine(pa.concat_tables([mine, *new]).cast(QUARANTINE_SCHEMA))


def _commit(
    report: IngestReport, state: IngestState | None, runs: dict[str, SplitRun], splits: tuple[str, ...],
    out_dir: Path, run_no: int, layout: str, verify_images: str, old_quarantine: pa.Table,
    pending: dict[str, pa.Table], images: dict[str, ImageIndex], listings: dict[str, list[pa.Table]], t0: float,
) -> IngestReport:
    """Counts, the bad-fraction check, then publish: run tables, parts, state (the commit point), views."""
    quarantine_by_split = {s: _split_quarantine(old_quarantine, runs[s], s) for s in splits}
    new_state = IngestState(layout=layout, verify_images=verify_images, splits_order=list(splits), run=run_no)
    parts_new: dict[str, PartState | None] = {}
    for split in splits:
        run, srep = runs[split], runs[split].report
        prev = state.splits.get(split) if state is not None else None
        parts_new[split] = run.writer.close()
        new_q = pa.concat_tables([*run.quarantine, empty_quarantine()]).cast(QUARANTINE_SCHEMA)
        srep.n_quarantined = new_q.num_rows
        srep.n_kept = (parts_new[split].n_rows if parts_new[split] else 0) - srep.n_recovered
        srep.reasons, srep.examples = summarise(new_q)
        if srep.n_in != srep.n_kept + srep.n_quarantined:
            raise AssertionError(
                f"{split}: counts do not add up: {srep.n_in} in != {srep.n_kept} kept + {srep.n_quarantined} quarantined"
            )
        _check_lines(srep, layout, run.csv)
        srep.n_in_total = (prev.n_in_total if prev else 0) + srep.n_in
        srep.kept_total = (prev.kept_total if prev else 0) + srep.n_kept + srep.n_recovered
        srep.quarantined_total = quarantine_by_split[split].num_rows
        srep.reasons_total, _ = summarise(quarantine_by_split[split])
        srep.bad_fraction = srep.quarantined_total / max(srep.n_in_total, 1)
        srep.n_pending = pending[split].num_rows
        parts = list(prev.parts) if prev else []
        if parts_new[split] is not None:
            parts.append(parts_new[split])  # type: ignore[arg-type]
        srep.n_parts = len(parts)
        srep.manifest_digest = manifest_digest(split, parts)
        containers = images[split].fingerprints if split in images else {}
        new_state.splits[split] = SplitState(
            csv=run.csv, shards=run.shards, containers=containers, parts=parts, n_in_total=srep.n_in_total,
            kept_total=srep.kept_total, quarantined_total=srep.quarantined_total, line_numbers=srep.line_numbers,
        )
        report.splits[split] = srep
    quarantine = pa.concat_tables([quarantine_by_split[s] for s in splits]).cast(QUARANTINE_SCHEMA)
    _log_summary(report)
    report.error = _too_bad_message(report)
    if report.error is not None:
        report.ok = False
        for r in runs.values():
            r.writer.discard()
        _remove_outputs(out_dir, splits)
        write_parquet_atomic(quarantine, Path(report.quarantine_path))
        report.elapsed_s = time.perf_counter() - t0
        write_text_atomic(report.to_json(), Path(report.report_path))
        raise IngestError(report.error)

    run_dir = _run_dir(out_dir, run_no)
    write_parquet_atomic(quarantine, run_dir / "quarantine.parquet")
    for split in splits:
        write_parquet_atomic(pending[split], run_dir / f"pending_{split}.parquet")
        if split in images:
            index = images[split].table
        else:
            old = _previous_index(out_dir, state, split) if state is not None else LISTING_SCHEMA.empty_table()
            index = pa.concat_tables([old, *listings[split]]).cast(LISTING_SCHEMA)
        write_parquet_atomic(index, run_dir / f"image_index_{split}.parquet")
    crash_point("run_tables")
    for split in splits:
        if parts_new[split] is not None:
            runs[split].writer.commit()
    crash_point("parts")
    report.state_path = str(save_state(new_state, out_dir))  # the commit point
    crash_point("state")
    _publish(new_state, out_dir, run_dir, splits)  # a re-run repeats it when killed before its end
    for split in splits:
        report.splits[split].manifest_path = str(out_dir / "manifest" / f"{split}.parquet")
    report.elapsed_s = time.perf_counter() - t0
    write_text_atomic(report.to_json(), Path(report.report_path))
    crash_point("report")
    log.info("ingest done in %.1f s; report %s", report.elapsed_s, report.report_path)
    return report


def _check_lines(srep: SplitReport, layout: str, csv: Any) -> None:
    """Raise AssertionError unless the CSV's physical lines read add up to its rows' lines."""
    if layout != "csv" or srep.line_numbers != "physical" or srep.bytes_parsed == 0:
        return
    header = int(csv is not None and csv.n_bytes == srep.bytes_parsed)  # read from the start
    if srep.n_lines != header + srep.n_blank_lines + srep.n_lines_kept + srep.n_lines_quarantined:
        raise AssertionError(
            f"{srep.csv_path}: lines do not add up: {srep.n_lines} read != {header} header + {srep.n_blank_lines} "
            f"blank + {srep.n_lines_kept} kept + {srep.n_lines_quarantined} quarantined"
        )


def _publish(state: IngestState, out_dir: Path, run_dir: Path, splits: tuple[str, ...]) -> None:
    """After the commit: public quarantine / image index, and removal of what the state no longer lists.

    Idempotent: the no-op re-run calls it again, so a run killed after saving its state
    (before or during this) is finished by the next run.
    """
    _link_or_copy(run_dir / "quarantine.parquet", out_dir / "quarantine.parquet")
    for split in splits:
        _link_or_copy(run_dir / f"image_index_{split}.parquet", out_dir / "image_index" / f"{split}.parquet")
    crash_point("publish")
    for split in splits:
        part_dir = out_dir / "manifest" / f"{split}.parquet"
        part_dir.mkdir(parents=True, exist_ok=True)
        for orphan in orphan_parts(part_dir, state.splits[split].parts):
            orphan.unlink(missing_ok=True)
    for old in (out_dir / _RUNS_DIR).iterdir():
        if old != run_dir:
            shutil.rmtree(old, ignore_errors=True)
    for folder in (out_dir, out_dir / "image_index"):  # temp files of writes a kill interrupted
        for tmp in folder.glob(".*.tmp"):
            if _ATOMIC_TMP.fullmatch(tmp.name):
                tmp.unlink(missing_ok=True)
    crash_point("cleanup")


def _remove_outputs(out_dir: Path, splits: tuple[str, ...]) -> None:
    """Remove manifests, run tables and state: a failed validation leaves no manifest to trust."""
    drop_state(out_dir)
    shutil.rmtree(out_dir / _RUNS_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / "image_index", ignore_errors=True)
    for split in splits:
        path = out_dir / "manifest" / f"{split}.parquet"
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _finish_noop(report: IngestReport, state: IngestState, out_dir: Path, quarantine: pa.Table,
                 pending: dict[str, pa.Table], t0: float) -> IngestReport:
    """A re-run with nothing new: finish publishing, report the totals (and re-check max_bad_fraction)."""
    report.noop = True
    _publish(state, out_dir, _run_dir(out_dir, state.run), tuple(state.splits_order))
    for split, s in state.splits.items():
        mine = quarantine.filter(pc.equal(quarantine["split"], split))
        srep = SplitReport(
            split=split, csv_path=str(Path(report.root) / (f"{split}.csv" if state.layout == "csv" else split)),
            mode="unchanged", n_in_total=s.n_in_total, kept_total=s.kept_total,
            quarantined_total=s.quarantined_total, bad_fraction=s.quarantined_total / max(s.n_in_total, 1),
            manifest_path=str(out_dir / "manifest" / f"{split}.parquet"), manifest_digest=manifest_digest(split, s.parts),
            n_parts=len(s.parts), line_numbers=s.line_numbers,  # type: ignore[arg-type]
            n_pending=pending[split].num_rows,
        )
        srep.reasons_total, _ = summarise(mine)
        report.splits[split] = srep
    _log_summary(report)
    report.error = _too_bad_message(report)
    report.elapsed_s = time.perf_counter() - t0
    if report.error is not None:
        report.ok = False
        _remove_outputs(out_dir, tuple(state.splits_order))
        write_text_atomic(report.to_json(), Path(report.report_path))
        raise IngestError(report.error)
    log.info("ingest: nothing new in %s since run %d (%.1f s)", report.root, state.run, report.elapsed_s)
    write_text_atomic(report.to_json(), Path(report.report_path))
    return report


def _log_summary(report: IngestReport) -> None:
    """Log counts per split and each reason with its count and examples; note splits without rows."""
    for s in report.splits.values():
        if s.n_in_total == 0:
            s.warning = f"{s.csv_path}: no rows (a header only)" if report.layout == "csv" else f"{s.csv_path}: no samples"
            log.warning("%s", s.warning)
        log.info(
            "%s (%s): %d rows in, %d kept, %d quarantined this run; %d kept, %d quarantined (%.2f%%) in all",
            s.split, s.mode, s.n_in, s.n_kept, s.n_quarantined, s.kept_total, s.quarantined_total,
            100 * s.bad_fraction,
        )
        for reason, count in s.reasons.items():
            log.warning(
                "%s: %d rows quarantined as %s, e.g.\n  %s",
                s.split, count, reason, "\n  ".join(s.examples[reason]),
            )
