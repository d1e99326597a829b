"""Plan an ingest run: the arguments, the layout, the state to build on, what is new per split.

`plan_run` detects the layout ("csv" or "webdataset"), fails early on missing inputs and
wrong CSV headers (before streaming gigabytes of CSV), loads the previous state
(geodata.ingest.incremental) and keeps it only when this run can build on it
(`usable_state`), then finds per split what is new: the CSV bytes appended (`csv_plan`),
the new or changed image shards (`update_image_index`), the new tar shards (WebDataset,
`wds_shard_plan`). Anything but appends makes every split start over (a full re-ingest; the
report says why). The `RunPlan` holds all this, with the tables the last committed run left.

Each run writes its tables (pending rows, quarantine, image index) under
`out_dir/.runs/run-N/` (`run_dir`); the state names the current one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geodata.ingest.csv_read import check_header, read_header
from geodata.ingest.image_index import ImageIndex, update_image_index
from geodata.ingest.image_listing import LISTING_SCHEMA
from geodata.ingest.incremental import CsvPlan, IngestState, SplitState, csv_plan, load_state
from geodata.ingest.quarantine import AFTER_DUPLICATE_REASONS, QUARANTINE_SCHEMA, empty_quarantine
from geodata.ingest.split_wds import wds_shard_plan
from geodata.ingest.validate import ID_REGEX, MANIFEST_SCHEMA, IdSet

__all__ = ["RUNS_DIR", "Layout", "RunPlan", "VerifyImages", "check_args", "detect_layout", "plan_run",
           "previous_index", "run_dir", "usable_state"]

log = logging.getLogger(__name__)

VerifyImages = Literal["none", "exists", "decode"]
Layout = Literal["auto", "csv", "webdataset"]
RUNS_DIR = ".runs"  # per-run pending / quarantine / image index; the state names the current one


@dataclass
class RunPlan:
    """What one ingest run reads: per split, what is new since the state it builds on."""

    root: Path
    out_dir: Path
    splits: tuple[str, ...]
    layout: str  # "csv" or "webdataset"
    verify_images: str
    state: IngestState | None  # the committed state this run appends to; None: a full ingest
    why_full: str  # why a full ingest ('' when appending)
    run_no: int = 0
    csv: dict[str, CsvPlan] = field(default_factory=dict)  # CSV: the bytes to parse per split
    images: dict[str, ImageIndex] = field(default_factory=dict)  # CSV with image checks: the image index
    shards: dict[str, tuple[list[Path], dict[str, str]]] = field(default_factory=dict)  # WebDataset: new, all
    quarantine: pa.Table = field(default_factory=empty_quarantine)  # earlier runs' quarantine rows
    pending: dict[str, pa.Table] = field(default_factory=dict)  # earlier image_missing rows per split

    def input_path(self, split: str) -> Path:
        """The split's input: root/{split}.csv, or the WebDataset folder root/{split}."""
        return self.root / (f"{split}.csv" if self.layout == "csv" else split)

    @property
    def nothing_new(self) -> bool:
        """True when this run appends and no split has new CSV bytes, tar shards or image containers."""
        return self.state is not None and all(
            (self.csv[s].start == self.csv[s].end if self.layout == "csv" else not self.shards[s][0])
            for s in self.splits
        ) and not any(i.new_containers for i in self.images.values())

    def seen_ids(self) -> IdSet:
        """Every id that a new row would duplicate: kept, pending, and rejected after the duplicate check."""
        if self.state is None:
            return IdSet()
        parts = [np.zeros(0, np.int64)]
        for split, s in self.state.splits.items():
            part_dir = self.out_dir / "manifest" / f"{split}.parquet"
            for p in s.parts:
                parts.append(pq.read_table(part_dir / p.name, columns=["id"])["id"].to_numpy())
            parts.append(self.pending[split]["id"].to_numpy())
        quarantine = self.quarantine
        late = quarantine.filter(pc.is_in(quarantine["reason"], pa.array(list(AFTER_DUPLICATE_REASONS))))
        late_ids = late["id"].filter(pc.match_substring_regex(late["id"], ID_REGEX))
        parts.append(pc.cast(late_ids, pa.int64()).to_numpy())
        return IdSet(np.concatenate(parts))


def check_args(verify_images: str, max_bad_fraction: float, splits: tuple[str, ...], layout: str) -> None:
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


def _check_csv_inputs(root: Path, splits: tuple[str, ...], verify_images: str) -> None:
    """Fail early on a missing {split}.csv or images/{split} folder, before streaming gigabytes of CSV."""
    for split in splits:
        if not (root / f"{split}.csv").is_file():
            raise FileNotFoundError(
                f"{root / f'{split}.csv'} not found; point root at the OSV-5M release folder "
                "(the one holding train.csv, test.csv and images/), or at the WebDataset copy"
            )
    if verify_images == "none":
        return
    for split in splits:
        if not (root / "images" / split).is_dir():
            raise FileNotFoundError(
                f"{root / 'images' / split} not found; expected the release's "
                f"images/{split}/NN.zip (or unzipped folders), or pass verify_images='none'"
            )


def usable_state(state: IngestState | None, layout: str, verify_images: str, splits: tuple[str, ...],
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
    if not run_dir(out_dir, state.run).is_dir():
        return None, "the previous run's pending/quarantine tables are missing"
    return state, ""


def run_dir(out_dir: Path, run: int) -> Path:
    """The folder of run `run`'s tables."""
    return out_dir / RUNS_DIR / f"run-{run:05d}"


def _read_or_empty(path: Path, schema: pa.Schema) -> pa.Table:
    return pq.read_table(path).cast(schema) if path.is_file() else schema.empty_table()


def previous_index(out_dir: Path, state: IngestState, split: str) -> pa.Table:
    """The image index (LISTING_SCHEMA) of `split` as the last committed run left it."""
    return _read_or_empty(run_dir(out_dir, state.run) / f"image_index_{split}.parquet", LISTING_SCHEMA)


def plan_run(
    root: Path, out_dir: Path, splits: tuple[str, ...], verify_images: str, layout: str, incremental: bool,
) -> RunPlan:
    """Plan an ingest of `root` into `out_dir` (see the module doc); creates `out_dir`.

    Raises FileNotFoundError (missing input), OSV5MFormatError (a wrong CSV header),
    UnsafeMemberError (an archive with escaping member names).
    """
    layout = detect_layout(root, splits) if layout == "auto" else layout
    if layout == "csv":
        _check_csv_inputs(root, splits, verify_images)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_state(out_dir) if incremental else None
    state, why_full = usable_state(loaded, layout, verify_images, splits, out_dir)
    if not incremental:
        why_full = "incremental=False"
    plan = RunPlan(root=root, out_dir=out_dir, splits=splits, layout=layout, verify_images=verify_images,
                   state=state, why_full=why_full)
    why = _whats_new(plan, check_headers=True)
    if why:  # anything but appends makes every split start over
        log.info("full re-ingest: %s", why)
        plan.state, plan.why_full = None, why
        _whats_new(plan, check_headers=False)
    state = plan.state
    plan.run_no = (state.run if state is not None else (loaded.run if loaded is not None else 0)) + 1
    if state is not None:
        last = run_dir(out_dir, state.run)
        plan.quarantine = _read_or_empty(last / "quarantine.parquet", QUARANTINE_SCHEMA)
        plan.pending = {s: _read_or_empty(last / f"pending_{s}.parquet", MANIFEST_SCHEMA) for s in splits}
    else:
        plan.pending = {s: MANIFEST_SCHEMA.empty_table() for s in splits}
    return plan


def _whats_new(plan: RunPlan, check_headers: bool) -> str:
    """Find what is new per split against `plan.state` (plan.csv, plan.images, plan.shards).

    Returns why this run cannot append to the state (the last reason found), '' when it can
    or when there is no state to append to.
    """
    plan.csv, plan.images, plan.shards = {}, {}, {}
    why = ""
    for split in plan.splits:
        prev = plan.state.splits.get(split) if plan.state is not None else None
        if plan.layout == "csv":
            reason = _whats_new_csv(plan, split, prev, check_headers)
        else:
            new, fps, reason = wds_shard_plan(plan.root, split, prev.shards if prev else {})
            plan.shards[split] = (new, fps)
        why = reason or why
    return why if plan.state is not None else ""


def _whats_new_csv(plan: RunPlan, split: str, prev: SplitState | None, check_header_first: bool) -> str:
    """Plan one CSV split (its new bytes; its image index unless verify_images='none'); why it
    needs a full re-ingest ('' when only appended to)."""
    csv_path = plan.root / f"{split}.csv"
    if check_header_first:  # fail early on a wrong header, before streaming any CSV
        check_header(read_header(csv_path), csv_path)
    plan.csv[split] = csv_plan(csv_path, prev.csv if prev else None)
    if plan.verify_images == "none":
        return plan.csv[split].reason
    previous = previous_index(plan.out_dir, plan.state, split) if plan.state is not None else None
    plan.images[split] = update_image_index(plan.root, split, previous, prev.containers if prev else {})
    return plan.images[split].full_reason or plan.csv[split].reason
