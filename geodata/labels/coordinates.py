"""Coordinates read from a table's two columns, checked, with errors naming the file and line."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _is_float(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _shown(value: object) -> str:
    """A cell value as shown in error messages: strings quoted, numbers plain."""
    return repr(value) if isinstance(value, str) else repr(float(value))  # type: ignore[arg-type]


def parse_coordinates(
    frame: pd.DataFrame,
    lat_col: str = "latitude",
    lon_col: str = "longitude",
    *,
    source: str = "frame",
    first_line: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (lat_deg, lon_deg) arrays (N,) from two columns of ``frame``.

    Strings are parsed with Python ``float()``. Raises ValueError naming ``source`` and
    the place of the first bad value: "line L" when ``first_line`` (the file line of
    frame row 0) is given, else "row i". Bad means: missing column, not a number,
    not finite, latitude outside [-90, 90] or longitude outside [-180, 180].
    Line numbers assume no quoted field spans lines.
    """
    missing = [c for c in (lat_col, lon_col) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; columns are {list(frame.columns)}"
        )

    def where(i: int) -> str:
        return f"line {first_line + i}" if first_line is not None else f"row {i}"

    out = []
    for col, limit in ((lat_col, 90.0), (lon_col, 180.0)):
        values = frame[col].to_numpy()
        if values.dtype.kind in "fiu":
            deg = values.astype(np.float64)
            values = deg
        else:
            values = values.astype(object)
            try:
                deg = values.astype(np.float64)  # float() per item
            except (TypeError, ValueError):
                bad = next(i for i, v in enumerate(values) if not _is_float(v))
                raise ValueError(
                    f"{source}, {where(bad)}: column {col!r} = {values[bad]!r} is not a number"
                ) from None
        bad_mask = ~np.isfinite(deg) | (np.abs(deg) > limit)
        if bad_mask.any():
            bad = int(np.flatnonzero(bad_mask)[0])
            raise ValueError(
                f"{source}, {where(bad)}: column {col!r} = {_shown(values[bad])} is outside "
                f"[-{limit:g}, {limit:g}] ({int(bad_mask.sum())} bad row(s) in all)"
            )
        out.append(deg)
    return out[0], out[1]
