"""Shared state for Dask workers as plain files: reading it back runs no code.

geodata.labels.parallel ships the heavy shared state of a run (a labeler, a places table) to its
workers as files in the run's folder, which may be on a shared filesystem. Those files are
data only: ``payload.json`` (the structure and the scalars), ``arrays.npz`` (numeric arrays,
read with ``allow_pickle=False``; strings and bytes as one UTF-8 / byte buffer plus offsets)
and ``frame-<i>.parquet`` (DataFrames). No pickle: a file planted where the payload goes can
at worst fail to load, never run code.

What can be stored: None, bool, int, float, str, Path, lists, tuples, dicts (any of these as
keys), numpy arrays (numeric, bool, or object arrays of str / bytes / None), numpy scalars,
DataFrames, and instances of the classes in ``PLAIN_TYPES``, each rebuilt by its own
``from_plain(state)`` classmethod from the state its ``to_plain()`` method gave. The class
names come from this fixed table: a payload names a class, it cannot name code.
"""

from __future__ import annotations

import importlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PAYLOAD_FORMAT = 1

#: The classes a payload may hold: name in the file -> "module:class". Each has ``to_plain()``
#: (its state as storable values) and the classmethod ``from_plain(state)``.
PLAIN_TYPES = {
    "GeoNamesLabeler": "geodata.labels.geonames:GeoNamesLabeler",
    "PolygonLabeler": "geodata.labels.polygons:PolygonLabeler",
}
_NAME_OF = {v: k for k, v in PLAIN_TYPES.items()}


class _Writer:
    def __init__(self, folder: Path) -> None:
        self.folder, self.arrays, self.n_frames = folder, {}, 0

    def array(self, a: np.ndarray) -> str:
        name = f"a{len(self.arrays)}"
        self.arrays[name] = a
        return name

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, str)) or type(obj) in (int, float):
            return obj
        if isinstance(obj, (int, float)) and not isinstance(obj, np.generic):  # int / float subclasses
            return int(obj) if isinstance(obj, int) else float(obj)
        if isinstance(obj, np.generic):
            return self.encode(np.asarray(obj)) | {"scalar": True}
        if isinstance(obj, Path):
            return {"t": "path", "v": str(obj)}
        if isinstance(obj, (list, tuple)):
            return {"t": type(obj).__name__ if type(obj) in (list, tuple) else "list", "v": [self.encode(x) for x in obj]}
        if isinstance(obj, dict):
            return {"t": "dict", "v": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        if isinstance(obj, np.ndarray):
            return self._ndarray(obj)
        if isinstance(obj, pd.DataFrame):
            name = f"frame-{self.n_frames}.parquet"
            self.n_frames += 1
            obj.to_parquet(self.folder / name, index=None)
            return {"t": "frame", "file": name}
        where = f"{type(obj).__module__}:{type(obj).__qualname__}"
        if where in _NAME_OF:
            return {"t": "object", "type": _NAME_OF[where], "state": self.encode(obj.to_plain())}
        raise TypeError(f"payload: a {where} cannot be stored as plain data (geodata.labels.payload stores numbers, "
                        f"strings, containers, arrays, DataFrames and the classes {sorted(PLAIN_TYPES)})")

    def _ndarray(self, a: np.ndarray) -> dict:
        if a.dtype != object:
            if a.dtype.kind not in "biufcUSMm":
                raise TypeError(f"payload: arrays of dtype {a.dtype} cannot be stored as plain data")
            return {"t": "array", "name": self.array(np.ascontiguousarray(a))}
        flat = a.ravel()
        none = np.fromiter((x is None for x in flat), bool, len(flat))
        values = flat[~none]
        if all(isinstance(x, str) for x in values):
            kind, parts = "str", [x.encode("utf-8", "surrogatepass") for x in values]
        elif all(isinstance(x, (bytes, bytearray)) for x in values):
            kind, parts = "bytes", [bytes(x) for x in values]
        else:
            types = sorted({type(x).__name__ for x in values})
            raise TypeError(f"payload: object arrays must hold str, bytes or None; this one holds {types}")
        offsets = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        return {"t": "objects", "kind": kind, "shape": list(a.shape),
                "data": self.array(np.frombuffer(b"".join(parts), np.uint8)), "offsets": self.array(offsets),
                "none": self.array(np.flatnonzero(none))}


class _Reader:
    def __init__(self, folder: Path, arrays) -> None:
        self.folder, self.arrays = folder, arrays

    def decode(self, obj: Any) -> Any:
        if not isinstance(obj, dict):
            return obj
        t = obj.get("t")
        if t in ("list", "tuple"):
            items = [self.decode(x) for x in obj["v"]]
            return items if t == "list" else tuple(items)
        if t == "dict":
            return {self.decode(k): self.decode(v) for k, v in obj["v"]}
        if t == "path":
            return Path(obj["v"])
        if t == "array":
            a = self.arrays[obj["name"]]
            return a[()] if obj.get("scalar") else a
        if t == "objects":
            return self._objects(obj)
        if t == "frame":
            name = str(obj["file"])
            if Path(name).name != name:
                raise ValueError(f"{self.folder}: payload frame name {name!r} is not a plain file name")
            return pd.read_parquet(self.folder / name)
        if t == "object":
            if obj.get("type") not in PLAIN_TYPES:
                raise ValueError(f"{self.folder}: payload names the class {obj.get('type')!r}, not one of "
                                 f"{sorted(PLAIN_TYPES)}")
            module, name = PLAIN_TYPES[obj["type"]].split(":")
            return getattr(importlib.import_module(module), name).from_plain(self.decode(obj["state"]))
        raise ValueError(f"{self.folder}: unknown payload entry {t!r}")

    def _objects(self, obj: dict) -> np.ndarray:
        buf = self.arrays[obj["data"]].tobytes()
        offsets, none = self.arrays[obj["offsets"]], self.arrays[obj["none"]]
        n = int(np.prod(obj["shape"], dtype=np.int64))
        if obj["kind"] == "str":
            parts = [buf[offsets[i]:offsets[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(offsets) - 1)]
        else:
            parts = [buf[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        out = np.empty(n, dtype=object)
        keep = np.ones(n, bool)
        keep[none] = False
        out[keep] = np.array(parts, dtype=object) if parts else []
        return out.reshape(obj["shape"])


def save_payload(obj: Any, folder: str | Path) -> Path:
    """Write ``obj`` as plain files into the new folder ``folder`` (built beside it, then renamed
    into place: a reader never sees half a payload). Raises TypeError for what cannot be stored."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        w = _Writer(tmp)
        doc = {"format": PAYLOAD_FORMAT, "root": w.encode(obj)}
        np.savez(tmp / "arrays.npz", **w.arrays)
        (tmp / "payload.json").write_text(json.dumps(doc), encoding="utf-8")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_payload(folder: str | Path) -> Any:
    """The object ``save_payload`` wrote to ``folder``: JSON, ``np.load(allow_pickle=False)`` and
    Parquet only. Raises ValueError naming the folder for a file that is not such a payload."""
    folder = Path(folder)
    try:
        doc = json.loads((folder / "payload.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder}: not a readable payload ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != PAYLOAD_FORMAT:
        raise ValueError(f"{folder}: payload format {doc.get('format') if isinstance(doc, dict) else None}, "
                         f"expected {PAYLOAD_FORMAT}")
    with np.load(folder / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return _Reader(folder, arrays).decode(doc["root"])
