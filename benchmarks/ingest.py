"""Ingest throughput and peak memory at OSV-5M size, against a bare pyarrow CSV read in the same run.

- Generates an OSV-5M-format train.csv of N rows (default 4.9M, ~2.9 GB like the release;
  `--quick`: 200k) with vectorised numpy + pyarrow.csv (no Python loop per row): the
  release's 32 columns in order, 15-16 digit ids, coordinates with 15-17 digits, long
  unique thumbnail URLs, ISO country codes including Namibia's "NA", region / city names
  with commas and quotes now and then, empty sub-regions, composite unique_* keys.
- Times, each in its own subprocess (peak RSS from the child's getrusage):
  1. `pyarrow.csv.read_csv(path)`: the bare parse baseline (threads, type inference,
     whole table in memory);
  2. `geodata.ingest.run.ingest_osv5m(..., verify_images="none")`: streaming validation +
     quarantine + Parquet manifest + content hash (images are not looked up: listing zips
     is benchmarked nowhere here, it costs ~0.3 s per 50k-member shard);
  3. the same ingest again on the unchanged input: the incremental no-op.
- Prints a table; ratio = ingest rows/s / pyarrow rows/s. Target: >= 0.5 and < 3 GB RSS.

    python benchmarks/ingest.py --quick      # 200k rows, under a minute
    python benchmarks/ingest.py              # 4.9M rows (~2.9 GB CSV in a temp folder, removed after)

Last line: ``ingest_vs_pyarrow: <ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from geodata.osv5m import OSV5M_COLUMNS  # noqa: E402

COUNTRIES = ["US", "FR", "BR", "JP", "RU", "DE", "NA", "ZA", "IN", "AU", "CA", "MX", "IT", "ES", "GB", "NZ", "KE"]
REGIONS = ["Piedmont", "Khomas", "Henan Sheng", "Canterbury", "Ile-de-France", 'Provincia di "Torino"',
           "Sao Paulo", "Bayern", "Tokyo", "New South Wales", "Ontario, Canada", "Western Cape", "Nairobi Area"]
SUBREGIONS = ["", "", "", "Timaru District", "Provincia di Torino", "Landkreis München", "Windhoek West",
              'County "Cork"', "Comarca de l'Alt Empordà, Girona", "Orange County"]
CITIES = ["Orbassano", "Pleasant Point", "Puyang Chengguanzhen", "Windhoek", "São José dos Campos",
          "Saint-Étienne", "Ōsaka", "Springfield, MA", 'Kap "Stadt"', "Nairobi", "Auckland", "Gifu"]
USERS = ["trafficmonitoring", "mapillary_user", "kartaview", "streetscapes", "roadrunner_42", "geo-walker"]


def _pool(rng: np.random.Generator, n: int, length: int) -> pa.Array:
    """n random base62 strings of `length` characters."""
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)
    chars = np.ascontiguousarray(alphabet[rng.integers(0, len(alphabet), size=(n, length))])
    return pa.array(chars.view(f"S{length}").ravel()).cast(pa.string())


def _ints(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _unquoted(cols: dict[str, pa.Array], names: list[str], typ: pa.DataType) -> None:
    """Numeric columns typed, so the CSV writer leaves them unquoted as the release does."""
    for name in names:
        cols[name] = pc.cast(cols[name], typ)


def _pick(rng: np.random.Generator, pool: list[str] | pa.Array, n: int) -> pa.Array:
    arr = pool if isinstance(pool, pa.Array) else pa.array(pool, pa.string())
    return arr.take(pa.array(rng.integers(0, len(arr), size=n)))


def chunk_table(rng: np.random.Generator, start: int, n: int, tokens: pa.Array) -> pa.Table:
    """n OSV-5M-shaped rows (all columns as the release spells them) starting at row `start`."""
    ids = 100_000_000_000_000 + (np.arange(start, start + n, dtype=np.int64) * 1_999_993) % 9_899_999_999_999_999
    lat = rng.uniform(-60, 75, n)
    lon = rng.uniform(-180, 180, n)
    country = _pick(rng, COUNTRIES, n)
    region = _pick(rng, REGIONS, n)
    sub = _pick(rng, SUBREGIONS, n)
    city = _pick(rng, CITIES, n)
    id_s = _ints(ids)
    url = pc.binary_join_element_wise(
        "https://scontent-cdg4-1.xx.fbcdn.net/m1/v/t6/", _pick(rng, tokens, n), id_s,
        "?stp=s1024x768&ccb=10-5&oh=00_", _pick(rng, tokens, n), "&oe=", _ints(rng.integers(10**7, 10**8, n)),
        "&_nc_sid=", _pick(rng, tokens, n), "",
    )
    unique_region = pc.binary_join_element_wise(region, country, "_")
    unique_sub = pc.if_else(pc.equal(sub, ""), "", pc.binary_join_element_wise(sub, unique_region, "_"))
    unique_city = pc.binary_join_element_wise(city, pc.if_else(pc.equal(sub, ""), "NaN", sub), unique_region, "_")
    lon_bin = rng.integers(0, 100, n)
    lat_bin = rng.integers(0, 100, n)
    cols = {
        "id": id_s,
        "latitude": pc.cast(pa.array(lat), pa.string()),  # shortest round-trip repr: ~17 digits
        "longitude": pc.cast(pa.array(lon), pa.string()),
        "thumb_original_url": url,
        "country": country,
        "sequence": _pick(rng, tokens, n),
        "captured_at": _ints(rng.integers(1_400_000_000_000, 1_700_000_000_000, n)),
        "lon_bin": _ints(lon_bin),
        "lat_bin": _ints(lat_bin),
        "cell": pc.binary_join_element_wise("(", _ints(lon_bin), ", ", _ints(lat_bin), ")", ""),
        "region": region,
        "sub-region": sub,
        "city": city,
        "land_cover": pc.cast(pa.array(rng.integers(1, 10, n) * 10.0), pa.string()),
        "road_index": pc.cast(pa.array(rng.integers(0, 8, n) * 1.0), pa.string()),
        "drive_side": _ints(rng.integers(0, 2, n)),
        "climate": _ints(rng.integers(1, 30, n)),
        "soil": pc.cast(pa.array(rng.integers(1, 15, n) * 1.0), pa.string()),
        "dist_sea": pc.cast(pa.array(rng.exponential(0.5, n)), pa.string()),
    }
    for name in OSV5M_COLUMNS:
        if name.startswith("quadtree"):
            cols[name] = _ints(rng.integers(0, 12_000, n))
    cols.update({
        "unique_region": unique_region, "unique_sub-region": unique_sub, "unique_city": unique_city,
        "unique_country": country, "creator_username": _pick(rng, USERS, n),
        "creator_id": _ints(rng.integers(10**14, 10**15, n)),
    })
    _unquoted(cols, ["id", "captured_at", "lon_bin", "lat_bin", "drive_side", "climate", "creator_id",
                     *[c for c in OSV5M_COLUMNS if c.startswith("quadtree")]], pa.int64())
    _unquoted(cols, ["latitude", "longitude", "dist_sea"], pa.float64())  # shortest round-trip digits
    return pa.table({name: cols[name] for name in OSV5M_COLUMNS})


def generate_csv(path: Path, n_rows: int, seed: int = 0, chunk: int = 250_000) -> float:
    """Write an OSV-5M-format CSV of n_rows; returns seconds taken."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    tokens = _pool(rng, 20_000, 22)
    with pcsv.CSVWriter(path, chunk_table(rng, 0, 1, tokens).schema,
                        write_options=pcsv.WriteOptions(quoting_style="needed")) as writer:
        for start in range(0, n_rows, chunk):
            writer.write_table(chunk_table(rng, start, min(chunk, n_rows - start), tokens))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- children


def _child(mode: str, data: str, out: str) -> None:
    """Run one measured step in this (fresh) process and print a JSON line."""
    from geodata.ingest.run import ingest_osv5m  # imported before the clock starts, like pyarrow

    t0 = time.perf_counter()
    extra: dict = {}
    if mode == "pyarrow":
        table = pcsv.read_csv(Path(data) / "train.csv")
        extra["rows"] = table.num_rows
    else:
        report = ingest_osv5m(Path(data), Path(out), splits=("train",), verify_images="none", max_bad_fraction=1.0)
        s = report.splits["train"]
        extra = {"rows": s.n_in, "kept": s.kept_total, "noop": report.noop, "digest": s.manifest_digest}
    elapsed = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    print(json.dumps({"mode": mode, "seconds": elapsed, "rss_gb": rss_gb, **extra}))


def measure(mode: str, data: Path, out: Path) -> dict:
    """Run `_child(mode)` in a subprocess; its JSON result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(data), str(out)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k rows (under a minute)")
    ap.add_argument("--rows", type=int, default=None, help="rows to generate (default 4.9M, quick 200k)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs of each (default 1, quick 2); best kept")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the generated CSV (removed after)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    n_rows = args.rows or (200_000 if args.quick else 4_900_000)
    repeat = args.repeat or (2 if args.quick else 1)
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hierloc-ingest-bench-", dir=args.tmp))
    try:
        data = work / "osv5m"
        data.mkdir()
        gen_s = generate_csv(data / "train.csv", n_rows)
        size_gb = (data / "train.csv").stat().st_size / 1e9
        print(f"generated {n_rows:,} rows ({size_gb:.2f} GB, {size_gb * 1e9 / n_rows:.0f} bytes/row) in {gen_s:.1f} s")
        base = ing = None
        for i in range(repeat):  # interleaved: the machine is shared and noisy
            b = measure("pyarrow", data, work / "unused")
            shutil.rmtree(work / "out", ignore_errors=True)
            g = measure("ingest", data, work / "out")
            base = b if base is None or b["seconds"] < base["seconds"] else base
            ing = g if ing is None or g["seconds"] < ing["seconds"] else ing
        noop = measure("ingest", data, work / "out")
        assert ing is not None and base is not None
        assert ing["kept"] == n_rows and base["rows"] == n_rows and noop["noop"] and noop["digest"] == ing["digest"]
        rows = [
            ("pyarrow.csv.read_csv (bare parse, all in memory)", base),
            ("ingest_osv5m verify_images='none' (validate + Parquet + hash)", ing),
            ("ingest_osv5m re-run, input unchanged (incremental no-op)", noop),
        ]
        print(f"\n| step | rows | seconds | rows/s | MB/s | peak RSS GB |")
        print("|---|---|---|---|---|---|")
        for name, r in rows:
            n = n_rows if name.startswith(("pyarrow", "ingest_osv5m verify")) else 0
            rate = f"{n / r['seconds']:,.0f}" if n else "-"
            mbs = f"{size_gb * 1e3 / r['seconds']:,.0f}"
            print(f"| {name} | {n:,} | {r['seconds']:.2f} | {rate} | {mbs} | {r['rss_gb']:.2f} |")
        ratio = base["seconds"] / ing["seconds"]
        print(f"\nmachine: {os.cpu_count()} CPU threads; best of {repeat}; ingest peak RSS {ing['rss_gb']:.2f} GB "
              f"(target < 3 GB); ratio target >= 0.5")
        print(f"ingest_vs_pyarrow: {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
