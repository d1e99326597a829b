"""Consistency between admin levels: the parent_code chain of an admin table, and the rule that
makes each point's polygons agree along it (geodata.labels.polygons, "Consistency between levels").

Rows index the admin table sorted by code; NO_ROW (-1) is "none". Per level and point, a lookup
gives a row and a status (INSIDE, SNAPPED or NONE); ``resolve_levels`` turns them into final rows
and codes into ``reason_names``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NO_ROW = -1
INSIDE, SNAPPED, NONE = 2, 1, 0  # per-level status; higher wins the anchor


def parent_rows(codes: np.ndarray, parent_code: np.ndarray, row_level: np.ndarray) -> np.ndarray:
    """Row of each row's parent: codes (R,) str, parent_code (R,) object (missing at level 0),
    row_level (R,) int64 -> (R,) int64, NO_ROW at level 0 or where the parent is not in the
    table (a broken chain). Raises ValueError naming the first row whose parent is not one level up.
    """
    has_parent = ~pd.isna(parent_code)
    parent_row = np.full(len(codes), NO_ROW, dtype=np.int64)
    parent_row[has_parent] = pd.Index(codes).get_indexer(parent_code[has_parent].astype(str))
    found = parent_row >= 0
    wrong = found & (row_level[np.maximum(parent_row, 0)] != row_level - 1)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise ValueError(
            f"admin row code={codes[i]!r} (level {row_level[i]}): parent_code "
            f"{parent_code[i]!r} is a level-{row_level[parent_row[i]]} unit, expected level {row_level[i] - 1}"
        )
    return parent_row


def ancestor_table(parent_row: np.ndarray, level_pos: np.ndarray, levels: tuple[int, ...]) -> np.ndarray:
    """ancestor[r, k]: row of r's ancestor at the k-th of ``levels`` (NO_ROW: none, or deeper than r).

    parent_row (R,) from parent_rows; level_pos (R,) the position of each row's level in
    ``levels`` (sorted level numbers) -> (R, L) int64. Parents are one level up: a level whose
    level above is missing from the table starts a new chain.
    """
    n = len(parent_row)
    ancestor = np.full((n, len(levels)), NO_ROW, dtype=np.int64)
    ancestor[np.arange(n), level_pos] = np.arange(n)
    for k in range(len(levels) - 1, 0, -1):
        known = ancestor[:, k] >= 0
        up = np.full(n, NO_ROW, dtype=np.int64)
        up[known] = parent_row[ancestor[known, k]]
        if levels[k - 1] == levels[k] - 1:  # parents are one level up, if that level exists
            ancestor[:, k - 1] = np.where(ancestor[:, k - 1] >= 0, ancestor[:, k - 1], up)
    return ancestor


def resolve_levels(
    row: np.ndarray, status: np.ndarray, snap_km: np.ndarray, ancestor: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consistent rows along the parent chain (geodata.labels.polygons' docstring).

    row (L, N) int64 and status (L, N) per level before consistency, snap_km (L, N), ancestor
    (R, L) from ancestor_table -> final rows (L, N), reason codes (L, N) into reason_names(),
    snap km (L, N) (NaN unless kept snapped).
    """
    n_levels, n = row.shape
    cols = np.arange(n)
    key = np.where(status > NONE, status.astype(np.int64) * n_levels + np.arange(n_levels)[:, None], -1)
    anchor = key.argmax(axis=0)  # deepest inside level, else deepest snapped
    has_anchor = key.max(axis=0) >= 0
    anchor_row = row[anchor, cols]
    # a finer snapped polygon inside the anchor's polygon refines it (deepest first)
    extended = np.zeros(n, dtype=bool)
    for k in range(n_levels - 1, 0, -1):
        up = ancestor[np.maximum(row[k], 0), anchor]
        take = has_anchor & ~extended & (k > anchor) & (row[k] >= 0) & (up == anchor_row)
        anchor = np.where(take, k, anchor)
        anchor_row = np.where(take, row[k], anchor_row)
        extended |= take

    final = np.full_like(row, NO_ROW)
    for k in range(n_levels):
        chain = np.where(has_anchor & (k <= anchor), ancestor[np.maximum(anchor_row, 0), k], NO_ROW)
        broken = has_anchor & (k < anchor) & (chain < 0)  # no parent in the table: keep our own
        final[k] = np.where(broken, row[k], chain)

    reason = np.where(status == INSIDE, 0, np.where(status == SNAPPED, 1, 2))  # "", snapped, none
    same = final == row
    filled = ~same & (row < 0)
    overridden = ~same & (row >= 0) & (final >= 0)
    dropped = ~same & (row >= 0) & (final < 0)
    anchor_b = np.broadcast_to(anchor, row.shape)
    reason = np.where(filled, 3 + anchor_b, reason)
    reason = np.where(overridden, 3 + n_levels + anchor_b, reason)
    reason = np.where(dropped, 3 + 2 * n_levels + anchor_b, reason)
    kept_km = np.where(same & (status == SNAPPED), snap_km, np.nan)
    return final, reason, kept_km


def reason_names(level_names: tuple[str, ...], max_snap_km: float) -> np.ndarray:
    """Reason strings indexed by the codes of resolve_levels (level_names coarse to fine)."""
    return np.array(
        ["", "snapped", f"no_polygon_within_{max_snap_km:g}km"]
        + [f"from_{m}" for m in level_names]
        + [f"overridden_by_{m}" for m in level_names]
        + [f"disagrees_with_{m}" for m in level_names],
        dtype=object,
    )
