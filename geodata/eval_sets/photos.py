"""A benchmark's photos: found under a folder by the names its metadata gives, and decoded in
batches (a thread pool, one batch ahead), each failure reported per photo.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from geodata.ingest.image_decode import DEFAULT_MAX_IMAGE_PIXELS, open_photo

log = logging.getLogger(__name__)

#: File name endings accepted as benchmark images (compared lower-case).
BENCHMARK_IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def _is_benchmark_image(name: str) -> bool:
    """An image file name (.jpg/.jpeg/.png, any case), not a macOS resource fork."""
    return not name.startswith("._") and name.lower().endswith(BENCHMARK_IMAGE_SUFFIXES)


@dataclass
class _ImageIndex:
    """The image files under a folder, by relative path, base name and stem (relative paths)."""

    by_rel: dict[str, Path] = field(default_factory=dict)
    by_base: dict[str, list[str]] = field(default_factory=dict)
    by_stem: dict[str, list[str]] = field(default_factory=dict)
    irregular: set[str] = field(default_factory=set)  # not regular files: matched last, refused when read


def _index_images(root: Path) -> _ImageIndex:
    """Walk ``root`` once, at any depth (macOS ``__MACOSX`` folders skipped)."""
    index = _ImageIndex()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
        for fname in sorted(filenames):
            if not _is_benchmark_image(fname):
                continue
            full = Path(dirpath) / fname
            rel = full.relative_to(root).as_posix()
            if not full.is_file():
                index.irregular.add(rel)
            index.by_rel[rel] = full
            index.by_base.setdefault(fname, []).append(rel)
            index.by_stem.setdefault(fname.rsplit(".", 1)[0], []).append(rel)
    return index


def _candidates(index: _ImageIndex, name: str) -> list[str]:
    """Relative paths of the files ``name`` may mean (find_benchmark_images' order of rules)."""
    text = name.replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    base = text.rsplit("/", 1)[-1]
    if text in index.by_rel:
        return [text]
    if _is_benchmark_image(base):
        return [r for r in index.by_base.get(base, []) if r.endswith("/" + text)] or index.by_base.get(base, [])
    return index.by_stem.get(base, [])


def find_benchmark_images(
    images_dir: str | Path, names: list[str] | pd.Series
) -> tuple[dict[str, Path], list[str]]:
    """Map image names (e.g. BenchmarkTable.rows["image"]) to files under ``images_dir``.

    Walks ``images_dir`` at any depth once. A name matches, in this order: the relative
    path itself ("sub/x.jpg"); a file whose relative path ends with it; a file of the same
    base name; for names without an image suffix, a file whose stem is the name's base
    name (x -> x.jpg / x.jpeg / x.png). Names are case-sensitive (suffixes are not).
    Several candidates: regular files first, then the shortest, then first, relative path
    (logged). Image-named fifos, devices and sockets are listed but never opened here: a
    name that only they match maps to them, and reading it (geodata.ingest.image_decode.open_photo)
    refuses it with a reason naming the file; the count is logged.
    Returns ({name: path}, [missing names, in input order]).
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: images folder not found")
    index = _index_images(root)
    found: dict[str, Path] = {}
    missing: list[str] = []
    n_ambiguous = 0
    for name in dict.fromkeys(str(n) for n in names):
        cands = _candidates(index, name)
        if not cands:
            missing.append(name)
            continue
        if len(cands) > 1:
            n_ambiguous += 1
        found[name] = index.by_rel[min(cands, key=lambda r: (r in index.irregular, len(r), r))]
    if index.irregular:
        log.warning("%s: %d image name(s) are not regular files (fifo, device, ...), e.g. %s; they are "
                    "never read", root, len(index.irregular), min(index.irregular))
    if n_ambiguous:
        log.warning("%s: %d image name(s) match several files; took the shortest path", root, n_ambiguous)
    return found, missing


def _decode(path: Path, max_image_pixels: int, min_side: int | None = None) -> tuple[object | None, str]:
    try:
        return open_photo(path, max_image_pixels, min_side=min_side), ""
    except Exception as exc:  # reported per photo; the others go on
        return None, photo_error(path, exc)


def photo_error(path: Path, exc: BaseException) -> str:
    """One line saying why ``path`` could not be read, without repeating the path."""
    text = str(exc) or type(exc).__name__
    prefix = f"{path}: "
    text = text[len(prefix):] if text.startswith(prefix) else text
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        text = f"{type(exc).__name__}: {exc.strerror or text}"
    return text.replace("\n", " ")


def decoded_batches(paths: Sequence[Path], batch_size: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                    workers: int | None = None, *, min_side: int | None = None
                    ) -> Iterator[list[tuple[int, object | None, str]]]:
    """Decode photos in batches of ``batch_size``: yields [(index in paths, RGB image or None, error)].

    A thread pool decodes the next batch while the caller works on the current one, so at
    most two batches of images are in memory. Errors (missing, not an image, over
    ``max_image_pixels``) are returned per photo, never raised. ``min_side``: JPEGs decoded at
    reduced scale (geodata.ingest.image_decode.decode_image; a model's Predictor.decode_min_side,
    so photos are read as its training features were); None: full resolution.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    workers = workers or min(4, os.cpu_count() or 1)
    starts = range(0, len(paths), batch_size)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(s: int):
            return [(i, pool.submit(_decode, paths[i], max_image_pixels, min_side))
                    for i in range(s, min(s + batch_size, len(paths)))]

        pending = submit(0) if len(paths) else []
        for s in starts:
            current = pending
            pending = submit(s + batch_size) if s + batch_size < len(paths) else []
            yield [(i, *fut.result()) for i, fut in current]

