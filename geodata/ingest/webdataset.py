"""Read (and, for tests and demos, write) the OSV-5M WebDataset copy: tar shards of samples.

Layout (DATA.md, WebDataset conventions): `root/{split}/**/*.tar`; a sample is the run of
consecutive members sharing a key (the member path up to the first '.' of its file name):

    <key>.jpg                           the photo
    <key>.json                          metadata: the release columns (id, latitude, longitude,
                                        country, ..., unique_*) with JSON types
    <key>.street_clip.npy               precomputed backbone features, one (D,) float vector
    <key>.dinov2_vitl14_registers.npy   per sample and name

`read_shard` turns a shard into batches for `geodata.ingest.validate.judge_batch`: the JSON
values as the release's raw strings (so CSV and WebDataset rows get the same checks and
schema), the jpg as an image reference (container = the tar, member, data offset, size),
and the .npy vectors. Members are read from their headers' offsets; nothing is extracted.
Links, devices and other non-regular members are never read: the sample's image, metadata
or feature is refused (a quarantine reason); a member name that could escape (absolute,
drive letter, '..') refuses the whole shard (`shard_refusal`): none of its members is
read, its samples are quarantined as image_unsafe (`refused_shard_rows`) and the ingest
goes on with the other shards.

Byte caps (geodata.capped_io), checked on the header's size before reading: a .jpg over
MAX_IMAGE_BYTES (64 MiB) is refused like a link (image_unsafe), a .json over MAX_JSON_BYTES
(64 KiB) is metadata_invalid, a .npy over `feature_cap(D)` is feature_invalid; a .npy header
is checked against the member's size before numpy allocates the array it declares.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geodata.capped_io import MAX_IMAGE_BYTES, MAX_JSON_BYTES, InputTooLargeError, check_size, feature_cap, size_refusal
from geodata.ingest.archive_members import is_safe_relative_name, iter_tar_members, tar_refusal
from geodata.ingest.npy_member import npy_array
from geodata.ingest.tar_headers import iter_headers
from geodata.ingest.quarantine import REASON_CODE, quarantine_table, truncate
from geodata.ingest.validate import ID_REGEX, IMAGE_REF_SCHEMA, IdSet
from geodata.osv5m import OSV5M_COLUMNS

#: Feature names of the public osv5m-wds copy (DATA.md).
WDS_FEATURES: tuple[str, ...] = ("street_clip", "dinov2_vitl14_registers")
SAMPLES_PER_BATCH = 512


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: 'a/123.street_clip.npy' -> ('a/123', 'street_clip.npy')."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def json_to_raw(value: object) -> str:
    """A JSON value as the release CSV would spell it: null / NaN -> '', numbers exactly, text as is."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)  # repr: shortest string that parses back exactly
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True)


@dataclass
class _Sample:
    key: str
    line: int
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)  # extension -> header


@dataclass
class WdsBatch:
    """Up to SAMPLES_PER_BATCH samples of one shard, aligned arrays of n rows.

    raw: the 32 release columns as strings; lines: sample number in the shard (1-based);
    refs: image references (IMAGE_REF_SCHEMA); jpg: the image bytes (None when not read);
    pre_code/pre_value: metadata problems; late_code/late_value: feature problems;
    feats: name -> (n, D) float16 when every vector of the batch is float16, else float32
    (NaN rows where invalid).
    """

    raw: dict[str, pa.Array]
    lines: np.ndarray
    refs: pa.Table
    jpg: list[bytes | None]
    pre_code: np.ndarray
    pre_value: pa.Array
    late_code: np.ndarray
    late_value: pa.Array
    feats: dict[str, np.ndarray]


def _unchecked_members(tar_path: Path) -> Iterator[tarfile.TarInfo]:
    """A tar's headers in order, names not checked (only for listing a refused shard)."""
    yield from iter_headers(tar_path)  # tarfile's listing, parsed fast


def _samples(tar_path: Path, members: Iterator[tarfile.TarInfo] | None = None) -> Iterator[_Sample]:
    """Group consecutive members by key (WebDataset samples), headers only (checked names by default)."""
    current: _Sample | None = None
    n = 0
    for info in members if members is not None else iter_tar_members(tar_path):
        if info.isdir():
            continue
        key, ext = split_key(info.name)
        if current is None or key != current.key or ext in current.members:
            if current is not None:
                yield current
            n += 1
            current = _Sample(key=key, line=n)
        current.members[ext] = info
    if current is not None:
        yield current


def _read(fh: io.BufferedReader, info: tarfile.TarInfo, cap: int, what: str) -> bytes:
    """Bytes of a regular member at its data offset (the caller has refused non-regular ones);
    InputTooLargeError, nothing read, when its header's size is over `cap`."""
    check_size(info.size, cap, info.name, what)
    fh.seek(info.offset_data)
    return fh.read(info.size)


def _metadata(fh: io.BufferedReader, sample: _Sample) -> tuple[dict[str, object] | None, str]:
    """(metadata dict or None, problem) of a sample's .json member."""
    info = sample.members.get("json")
    if info is None:
        return None, f"sample {sample.key!r} has no .json member"
    refused = tar_refusal(info)
    if refused is not None:
        return None, f"{info.name}: {refused}"
    try:
        meta = json.loads(_read(fh, info, MAX_JSON_BYTES, "metadata").decode("utf-8"))
    except InputTooLargeError as exc:
        return None, str(exc)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"{info.name}: not valid UTF-8 JSON ({exc})"
    if not isinstance(meta, dict):
        return None, f"{info.name}: JSON {type(meta).__name__}, expected an object"
    return meta, ""


def _feature(fh: io.BufferedReader, sample: _Sample, name: str, dims: dict[str, int]) -> tuple[np.ndarray | None, str]:
    """(a (D,) float16 (a float16 .npy) or float32 vector, or None, problem) of a sample's `<name>.npy`;
    fixes D on first sight."""
    info = sample.members.get(f"{name}.npy")
    if info is None:
        return None, f"sample {sample.key!r} has no {name}.npy"
    refused = tar_refusal(info)
    if refused is not None:
        return None, f"{info.name}: {refused}"
    try:
        arr = npy_array(_read(fh, info, feature_cap(dims.get(name)), "feature"))
    except InputTooLargeError as exc:
        return None, str(exc)
    except (ValueError, OSError, EOFError) as exc:
        return None, f"{info.name}: not a .npy array ({exc})"
    if arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[0] != 1):
        return None, f"{info.name}: dtype {arr.dtype} shape {arr.shape}, expected a float (D,) or (1, D) vector"
    vec = arr.reshape(-1).astype(np.float16 if arr.dtype == np.float16 else np.float32)  # kept as stored
    want = dims.setdefault(name, len(vec))
    if len(vec) != want:
        return None, f"{info.name}: {len(vec)} values, the other samples of {name} have {want}"
    if not np.isfinite(vec).all():
        return None, f"{info.name}: NaN or infinite values"
    return vec, ""


def read_shard(
    tar_path: Path,
    container: str,
    features: tuple[str, ...],
    dims: dict[str, int],
    *,
    read_images: bool = False,
    samples_per_batch: int = SAMPLES_PER_BATCH,
) -> Iterator[WdsBatch]:
    """The samples of one tar shard as WdsBatch batches (see the module docstring).

    container: the shard's path relative to the dataset root (written to the image
    reference); features: names of the .npy members every sample must have; dims: feature
    name -> D, shared across shards (set from the first valid vector); read_images: also
    read each jpg's bytes (for decoding).
    """
    batch: list[_Sample] = []
    with open(tar_path, "rb") as fh:
        for sample in _samples(tar_path):
            batch.append(sample)
            if len(batch) == samples_per_batch:
                yield _to_batch(fh, batch, container, features, dims, read_images)
                batch = []
        if batch:
            yield _to_batch(fh, batch, container, features, dims, read_images)


def _to_batch(
    fh: io.BufferedReader, samples: list[_Sample], container: str, features: tuple[str, ...],
    dims: dict[str, int], read_images: bool,
) -> WdsBatch:
    """One WdsBatch of `samples`: their metadata as raw columns, image references (and jpg
    bytes when `read_images`), feature vectors, and each sample's problems."""
    n = len(samples)
    cols: dict[str, list[str]] = {c: [] for c in OSV5M_COLUMNS}
    pre_code = np.zeros(n, np.int8)
    pre_value: list[str | None] = [None] * n
    late_code = np.zeros(n, np.int8)
    late_value: list[str | None] = [None] * n
    refs: dict[str, list] = {name: [] for name in IMAGE_REF_SCHEMA.names}
    jpg: list[bytes | None] = []
    vectors: dict[str, list[np.ndarray | None]] = {name: [] for name in features}
    for i, sample in enumerate(samples):
        meta, problem = _metadata(fh, sample)
        if meta is None:
            pre_code[i] = REASON_CODE["metadata_invalid"]
            pre_value[i] = truncate(problem)
            meta = {}
        stem = sample.key.rpartition("/")[2]
        for c in OSV5M_COLUMNS:
            cols[c].append(json_to_raw(meta.get(c, stem if c == "id" else None)))
        jpg.append(_image_ref(fh, sample, container, refs, read_images))
        problems = _sample_features(fh, sample, dims, vectors)
        if problems:
            late_code[i] = REASON_CODE["feature_invalid"]
            late_value[i] = truncate("; ".join(problems))
    return WdsBatch(
        raw={c: pa.array(cols[c], pa.string()) for c in OSV5M_COLUMNS},
        lines=np.asarray([s.line for s in samples], np.int64),
        refs=pa.table({k: pa.array(v, IMAGE_REF_SCHEMA.field(k).type) for k, v in refs.items()}, schema=IMAGE_REF_SCHEMA),
        jpg=jpg,
        pre_code=pre_code,
        pre_value=pa.array(pre_value, pa.string()),
        late_code=late_code,
        late_value=pa.array(late_value, pa.string()),
        feats={name: _feature_matrix(vectors[name], dims.get(name, 0)) for name in features},
    )


def _image_ref(fh: io.BufferedReader, sample: _Sample, container: str, refs: dict[str, list],
               read_images: bool) -> bytes | None:
    """Append the sample's jpg reference to `refs` (IMAGE_REF_SCHEMA columns; all null without a
    jpg); return its bytes when `read_images` and it is readable, else None."""
    info = sample.members.get("jpg")
    if info is None:
        for column in refs.values():
            column.append(None)
        return None
    refused = tar_refusal(info) or size_refusal(info.size, MAX_IMAGE_BYTES)
    refs["container"].append(container)
    refs["member"].append(info.name)
    refs["offset"].append(info.offset_data)
    refs["size"].append(info.size)
    refs["refused"].append(refused)
    return _read(fh, info, MAX_IMAGE_BYTES, "image") if read_images and refused is None else None


def _sample_features(fh: io.BufferedReader, sample: _Sample, dims: dict[str, int],
                     vectors: dict[str, list[np.ndarray | None]]) -> list[str]:
    """Append the sample's vector of each feature in `vectors` (None when invalid); the problems."""
    problems = []
    for name, found in vectors.items():
        vec, problem = _feature(fh, sample, name, dims)
        found.append(vec)
        if vec is None:
            problems.append(problem)
    return problems


def _feature_matrix(vectors: list[np.ndarray | None], dim: int) -> np.ndarray:
    """(n, dim) of one feature's vectors, NaN rows where a vector is None: float16 when every
    vector is float16 (precomputed fp16 features stay fp16 on disk), else float32."""
    found = [v for v in vectors if v is not None]
    half = bool(found) and all(v.dtype == np.float16 for v in found)
    matrix = np.full((len(vectors), dim), np.nan, np.float16 if half else np.float32)
    for i, vec in enumerate(vectors):
        if vec is not None:
            matrix[i] = vec
    return matrix


def shard_refusal(tar_path: Path, container: str, max_name_chars: int = 60) -> str | None:
    """Why a tar shard is refused whole (a member name that could escape: absolute, drive
    letter, '..'), naming the shard (`container`) and that member; None for a safe shard.
    Headers only."""
    for info in _unchecked_members(tar_path):
        if not is_safe_relative_name(info.name):
            name = info.name if len(info.name) <= max_name_chars else info.name[: max_name_chars - 3] + "..."
            return f"shard {container} refused: member {name!r} could escape the dataset folder; none of its members is used"
    return None


def refused_shard_rows(tar_path: Path, container: str, split: str, why: str, seen: IdSet) -> tuple[pa.Table, pa.Table]:
    """(quarantine, listing) of a refused shard: each sample quarantined as image_unsafe (its id
    from the member key; duplicate_id when seen before, as judge_batch would say), its jpg
    listed as refused. Nothing but headers is read; the numeric ids join `seen`."""
    samples = list(_samples(tar_path, _unchecked_members(tar_path)))
    ids = pa.array([s.key.rpartition("/")[2] for s in samples], pa.string())
    numeric = np.asarray(pc.match_substring_regex(ids, ID_REGEX).to_numpy(zero_copy_only=False), dtype=bool)
    codes = np.full(len(samples), REASON_CODE["image_unsafe"], np.int64)
    as_int = np.asarray([int(i) if ok else 0 for i, ok in zip(ids.to_pylist(), numeric, strict=True)], np.int64)
    codes[np.flatnonzero(numeric)[seen.add_first(as_int[numeric])]] = REASON_CODE["duplicate_id"]
    values = pa.array([why if c == REASON_CODE["image_unsafe"] else i for c, i in zip(codes, ids.to_pylist(), strict=True)])
    quarantine = quarantine_table(split, container, np.asarray([s.line for s in samples], np.int64), ids, codes, values)
    jpgs = [(s.key.rpartition("/")[2], s.members["jpg"]) for s in samples if "jpg" in s.members]
    listing = pa.table({
        "id": pa.array([k for k, _ in jpgs], pa.string()), "container": pa.array([container] * len(jpgs), pa.string()),
        "member": pa.array([i.name for _, i in jpgs], pa.string()), "size_bytes": pa.array([i.size for _, i in jpgs], pa.int64()),
        "offset": pa.array([i.offset_data for _, i in jpgs], pa.int64()), "refused": pa.array([why] * len(jpgs), pa.string()),
    })
    return quarantine, listing


def discover_features(tar_path: Path) -> tuple[str, ...]:
    """Names of the .npy members of a shard's first sample (e.g. ('street_clip', ...)), sorted."""
    for sample in _samples(tar_path):
        return tuple(sorted(ext[: -len(".npy")] for ext in sample.members if ext.endswith(".npy")))
    return ()


def find_shards(split_dir: Path) -> list[Path]:
    """The tar shards under a split folder, at any depth, in sorted path order."""
    return sorted(p for p in Path(split_dir).rglob("*.tar") if p.is_file())


def feature_shard_path(out_dir: Path, name: str, split: str, shard_rel: str) -> Path:
    """`out_dir/features/<name>/shard-<split>-<shard>.npz` for one tar shard.

    shard_rel: the shard's path under the split folder ('00000.tar'; '/' becomes '_').
    """
    stem = shard_rel.rsplit(".", 1)[0].replace("/", "_")
    return Path(out_dir) / "features" / name / f"shard-{split}-{stem}.npz"


# --------------------------------------------------------------------------- writing


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic shards
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def npy_bytes(vec: np.ndarray) -> bytes:
    """A vector as .npy file bytes."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(vec), allow_pickle=False)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, object]]) -> Path:
    """Write one WebDataset tar shard in the documented layout (for tests and demos).

    Each sample: {"key": str, "json": dict | bytes (raw member bytes) | None,
    "jpg": bytes | None, "npy": {name: (D,) array}}; None leaves the member out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for s in samples:
            key = str(s["key"])
            if s.get("jpg") is not None:
                _add(tf, f"{key}.jpg", s["jpg"])  # type: ignore[arg-type]
            meta = s.get("json")
            if meta is not None:
                _add(tf, f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode())
            for name, vec in (s.get("npy") or {}).items():  # type: ignore[union-attr]
                _add(tf, f"{key}.{name}.npy", npy_bytes(vec))
    return path
