"""An OSV-5M-shaped dataset at any size, fast: the data of the scale rehearsal (benchmarks/pipeline_scale.py).

Writes ``out/train.csv`` and ``out/test.csv`` (the 32 release columns) and the WebDataset copy
``out/{split}/NNNNN.tar`` whose samples are ``<id>.json`` (the same row) and ``<id>.street_clip.npy``
(a 768-d float16 vector); no jpg (no backbone runs 4.9M images on two cores).

- Places as the demo draws them (geodata.demo.locations): real GeoNames places, skewed towards some
  countries (sample_places), 1 + a log-normal multinomial of images each (images_per_place), each
  image a few km off its place and inside the place's nearest-neighbour cell (offset_points with
  VORONOI_MARGIN), so its label is its place's: the places are labelled once (label_frame, the
  release's nearest-GeoNames-place rule) and the labels gathered, giving real, consistent
  country / region / sub-region / city and unique_* keys. A seeded random ``test_rows`` of all
  points form the test split, as in the demo.
- The other release columns (urls, sequence, capture time, bins, quadtrees, creators, ...) are
  benchmarks/ingest.py's generated values, so rows weigh what the release's weigh (~600 bytes).
- Features: the source place's code vector (one of CODEBOOK rows) plus noise from a pool, float16:
  learnable, cheap (two gathers per chunk, no per-row normal draws).
- Tar shards are written with numpy, without tarfile: every member has one ustar header (built
  in one array op per shard, checksums included); each JSON member is padded with spaces to the
  shard's widest (valid JSON), so a shard is an (n, record) byte matrix filled column block by
  column block.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from benchmarks.ingest import _pool, chunk_table
from geodata.atomic import write_text_atomic
from geodata.demo.locations import (VORONOI_MARGIN, draw_ids, images_per_place, nearest_other_place_deg,
                                    offset_points, sample_places)
from geodata.labels.geonames import default_labeler
from geodata.labels.geonames_csv import label_frame
from geodata.osv5m import LABEL_COLUMNS, OSV5M_COLUMNS, UNIQUE_COLUMNS

DIM = 768
FEATURE = "street_clip"
IMAGES_PER_CITY = 22.0  # the demo's mean
CODEBOOK = 4096  # place code vectors (place row % CODEBOOK)
NOISE_POOL = 16_384
MARKER = "scale_data.json"
_NPY_HEADER_LEN = 128


def _npy_header(dim: int) -> bytes:
    """The 128-byte .npy v1.0 header of a (dim,) float16 vector (what np.save writes)."""
    head = "{'descr': '<f2', 'fortran_order': False, 'shape': (%d,), }" % dim
    head += " " * (_NPY_HEADER_LEN - 10 - len(head) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head.encode()


def _tar_headers(names: np.ndarray, size: int) -> np.ndarray:
    """(n, 512) uint8 ustar headers of regular files named ``names`` (bytes, < 100 each), all of ``size`` bytes."""
    n = len(names)
    h = np.zeros((n, 512), np.uint8)
    h[:, :100] = np.frombuffer(names.astype("S100").tobytes(), np.uint8).reshape(n, 100)
    for off, text in ((100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"),
                      (124, b"%011o\0" % size), (136, b"%011o\0" % 0), (148, b" " * 8), (156, b"0"),
                      (257, b"ustar\x0000")):
        h[:, off:off + len(text)] = np.frombuffer(text, np.uint8)
    chk = h.sum(axis=1, dtype=np.int64)
    digits = (chk[:, None] // 8 ** np.arange(5, -1, -1)) % 8 + ord("0")
    h[:, 148:154] = digits
    h[:, 154], h[:, 155] = 0, ord(" ")
    return h


def _pad512(n: int) -> int:
    return -(-n // 512) * 512


def write_tar(path: Path, ids: np.ndarray, jsons: pa.Array, feats: np.ndarray) -> int:
    """One WebDataset shard: per sample ``<id>.json`` (padded with spaces to the widest) and
    ``<id>.street_clip.npy`` (float16); returns its bytes. Written to a temp name, then renamed."""
    n = len(ids)
    lens = pc.binary_length(jsons.cast(pa.binary())).to_numpy()
    jw = int(lens.max())
    jp, npy_size = _pad512(jw), _NPY_HEADER_LEN + feats.shape[1] * 2
    rec = 512 + jp + 512 + _pad512(npy_size)
    buf = np.zeros((n, rec), np.uint8)
    stems = np.char.mod("%d", ids).astype("S32")
    buf[:, :512] = _tar_headers(np.char.add(stems, b".json"), jw)
    text = np.array(jsons.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype=f"S{jw}")
    body = np.frombuffer(text.tobytes(), np.uint8).reshape(n, jw).copy()
    body[body == 0] = ord(" ")  # JSON text has no raw NUL: the padding becomes whitespace
    buf[:, 512:512 + jw] = body
    o = 512 + jp
    buf[:, o:o + 512] = _tar_headers(np.char.add(stems, f".{FEATURE}.npy".encode()), npy_size)
    buf[:, o + 512:o + 512 + _NPY_HEADER_LEN] = np.frombuffer(_npy_header(feats.shape[1]), np.uint8)
    buf[:, o + 512 + _NPY_HEADER_LEN:o + 512 + npy_size] = feats.astype("<f2").view(np.uint8)
    tmp = path.with_suffix(".tar.tmp")
    with open(tmp, "wb") as f:
        f.write(buf.data)
        f.write(bytes(1024))  # end of archive
    tmp.replace(path)
    return buf.nbytes + 1024


def _json_column(table: pa.Table) -> pa.Array:
    """Each row of ``table`` as a JSON object (numbers bare, strings quoted and escaped)."""
    parts: list = []
    for i, name in enumerate(table.column_names):
        col = table.column(name).combine_chunks()
        if pa.types.is_string(col.type):
            s = pc.replace_substring(pc.replace_substring(col, "\\", "\\\\"), '"', '\\"')
            parts += [("{" if i == 0 else ", ") + json.dumps(name) + ': "', s, '"']
        else:
            parts += [("{" if i == 0 else ", ") + json.dumps(name) + ": ", pc.cast(col, pa.string())]
    parts.append("}")
    return pc.binary_join_element_wise(*parts, "")


def _points(rows: int, test_rows: int, seed: int) -> dict:
    """The demo's sampling for rows + test_rows points: per point its place (labelled), lat/lon, id, split."""
    rng_place, rng_count, rng_offset, rng_id, rng_split = (np.random.default_rng(s) for s in
                                                          np.random.SeedSequence(seed).spawn(5))
    labeler = default_labeler()
    places = labeler.places
    n = rows + test_rows
    n_cities = min(len(places), max(1, round(n / IMAGES_PER_CITY)))
    chosen = sample_places(places, n_cities, rng_place)
    counts = images_per_place(n_cities, n, rng_count)
    source = np.repeat(np.arange(n_cities), counts)  # index into chosen
    plat, plon = (places[c].to_numpy(np.float64)[chosen] for c in ("lat", "lon"))
    lat, lon = offset_points(plat[source], plon[source], rng_offset,
                             max_offset_deg=(VORONOI_MARGIN * nearest_other_place_deg(labeler.tree, chosen))[source])
    labels = label_frame(pd.DataFrame({"latitude": plat, "longitude": plon}), labeler=labeler)
    order = rng_split.permutation(n)
    return {"source": source, "lat": lat, "lon": lon, "ids": draw_ids(n, rng_id), "labels": labels,
            "place": chosen, "split": {"test": order[:test_rows], "train": order[test_rows:]},
            "n_cities": n_cities}


def _labels_table(labels) -> dict[str, pa.Array]:
    out = {}
    for col in (*LABEL_COLUMNS, *UNIQUE_COLUMNS):
        values = labels[col].astype(object).where(labels[col].notna(), "")
        out[col] = pa.array(values.astype(str).to_numpy(dtype=object), pa.string())
    return out


def generate(out: Path, rows: int, test_rows: int, *, seed: int = 0, shard_size: int = 10_000) -> dict:
    """Write the dataset into ``out`` unless its marker says it holds these very arguments; returns
    {"rows", "test_rows", "seconds", "rows_per_s", "bytes", "reused"}."""
    out = Path(out)
    args = {"rows": rows, "test_rows": test_rows, "seed": seed, "shard_size": shard_size, "dim": DIM, "version": 1}
    marker = out / MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("args") == args:
            return {**done["stats"], "reused": True}
        raise SystemExit(f"{out}: holds a dataset made with other arguments ({done.get('args')}); "
                         f"give another --out or delete it")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty and not a dataset of this script; give another --out")
    t0 = time.perf_counter()
    pts = _points(rows, test_rows, seed)
    labels = _labels_table(pts["labels"])
    rng = np.random.default_rng(seed + 1)
    tokens = _pool(rng, 20_000, 22)
    codebook = rng.normal(size=(CODEBOOK, DIM)).astype(np.float32)
    noise = (0.5 * rng.normal(size=(NOISE_POOL, DIM))).astype(np.float32)
    total = 0
    for split in ("train", "test"):
        idx = pts["split"][split]
        (out / split).mkdir(parents=True, exist_ok=True)
        tmp_csv = out / f".{split}.csv.tmp"
        with pcsv.CSVWriter(tmp_csv, chunk_table(rng, 0, 1, tokens).schema,
                            write_options=pcsv.WriteOptions(quoting_style="needed")) as writer:
            for k, start in enumerate(range(0, len(idx), shard_size)):
                sel = idx[start:start + shard_size]
                src = pts["source"][sel]
                t = chunk_table(rng, start, len(sel), tokens)
                cols = {"id": pa.array(pts["ids"][sel]), "latitude": pa.array(pts["lat"][sel]),
                        "longitude": pa.array(pts["lon"][sel]),
                        **{c: v.take(pa.array(src)) for c, v in labels.items()}}
                t = pa.table({c: cols.get(c, t.column(c)) for c in OSV5M_COLUMNS})
                writer.write_table(t)
                f = codebook[pts["place"][src] % CODEBOOK] + noise[rng.integers(0, NOISE_POOL, len(sel))]
                total += write_tar(out / split / f"{k:05d}.tar", pts["ids"][sel], _json_column(t), f.astype(np.float16))
        tmp_csv.replace(out / f"{split}.csv")
        total += (out / f"{split}.csv").stat().st_size
    seconds = time.perf_counter() - t0
    stats = {"rows": rows, "test_rows": test_rows, "seconds": round(seconds, 2),
             "rows_per_s": round((rows + test_rows) / seconds), "bytes": total, "n_places": int(pts["n_cities"])}
    write_text_atomic(json.dumps({"args": args, "stats": stats}, indent=2), marker)
    return {**stats, "reused": False}
