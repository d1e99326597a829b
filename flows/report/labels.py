"""Map labels that never collide: greedy placement over a few offsets per label, on the rendered
text extents.

Labels come in rank order. Each has an anchor (its marker's centre, display pixels) and a
size (its rendered box, pixels). A label may sit at one of ``slots()``: eight places around
its marker (touching it), then rows further out to the right and left with a leader line.
The first label (the top answer) is always placed: at the first slot inside the axes that
covers neither an obstacle (the truth star, the legend) nor another marker, else the least bad.
Every other label takes the first slot inside the axes that overlaps no label placed before it,
no obstacle and not the first label's marker, preferring slots that cover no other marker;
a label with no such slot is dropped (the caller lists it in a numbered legend); no leader
line may cross the first label. So no two placed boxes overlap and none overlaps the first one.

Boxes are (x0, y0, x1, y1) in display pixels. The geometry here is plain arithmetic;
``measure`` is the only call into Matplotlib (the text's window extent from the renderer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.backend_bases import RendererBase
from matplotlib.figure import Figure
from matplotlib.text import Text

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (display pixels)


class Slot(NamedTuple):
    """Where a label sits: its text anchor ``dx_pt``, ``dy_pt`` points from the marker's centre,
    aligned ``ha``/``va`` there; ``leader``: a line joins it to the marker."""

    dx_pt: float
    dy_pt: float
    ha: str
    va: str
    leader: bool


def slots(radius_pt: float, row_pt: float, *, rows: int = 4) -> list[Slot]:
    """The places tried for a label, in order of preference: 8 around a marker of
    ``radius_pt`` (right, left, the 4 diagonals, above, below), then ``rows`` rows of height
    ``row_pt`` above and below the marker, right and left of it, with a leader line. The
    caller adds the box's padding to ``radius_pt``: the slots are anchors of the bare text."""
    d = radius_pt + 1.0  # 1 pt between the marker and the label's box
    e = 0.72 * d  # the diagonals touch the marker's circle, not its bounding square
    ring = [Slot(d, 0, "left", "center", False), Slot(-d, 0, "right", "center", False),
            Slot(e, e, "left", "bottom", False), Slot(e, -e, "left", "top", False),
            Slot(-e, e, "right", "bottom", False), Slot(-e, -e, "right", "top", False),
            Slot(0, d, "center", "bottom", False), Slot(0, -d, "center", "top", False)]
    far = d + 14.0
    rows_out = [Slot(sx * far, sy * k * row_pt, "left" if sx > 0 else "right", "center", True)
                for k in range(1, rows + 1) for sx in (1, -1) for sy in (1, -1)]
    return ring + rows_out


def label_box(anchor_px: Sequence[float], size_px: Sequence[float], slot: Slot, px_per_pt: float,
              pad_px: float) -> Box:
    """The box of a label of text size ``size_px`` (w, h) in ``slot`` of a marker at ``anchor_px``,
    grown by ``pad_px`` on every side (the drawn bbox patch's padding)."""
    w, h = size_px
    x = anchor_px[0] + slot.dx_pt * px_per_pt
    y = anchor_px[1] + slot.dy_pt * px_per_pt
    x0 = {"left": x, "right": x - w, "center": x - w / 2}[slot.ha]
    y0 = {"bottom": y, "top": y - h, "center": y - h / 2}[slot.va]
    return x0 - pad_px, y0 - pad_px, x0 + w + pad_px, y0 + h + pad_px


def overlaps(a: Box, b: Box) -> bool:
    """Do the two boxes share interior (touching edges do not count)?"""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def crosses(p: Sequence[float], q: Sequence[float], box: Box) -> bool:
    """Does the segment p -> q pass through the interior of ``box``? (Liang-Barsky clipping.)"""
    t0, t1 = 0.0, 1.0
    d = (q[0] - p[0], q[1] - p[1])
    for axis in (0, 1):
        lo, hi = box[axis] - p[axis], box[axis + 2] - p[axis]
        if d[axis] == 0.0:
            if not lo < 0.0 < hi:
                return False
            continue
        a, b = lo / d[axis], hi / d[axis]
        t0, t1 = max(t0, min(a, b)), min(t1, max(a, b))
    return t0 < t1


def inside(a: Box, frame: Box) -> bool:
    return a[0] >= frame[0] and a[1] >= frame[1] and a[2] <= frame[2] and a[3] <= frame[3]


def place(anchors_px: np.ndarray, sizes_px: np.ndarray, pads_px: Sequence[float], slot_lists: Sequence[Sequence[Slot]],
          marker_boxes: Sequence[Box], frame: Box, obstacles: Sequence[Box], px_per_pt: float,
          ) -> list[tuple[Slot, Box] | None]:
    """Greedy placement of labels 0..n-1 (rank order): (n, 2) anchors and text sizes, (n,) box
    paddings, the slots each may take; the markers' boxes, label i's own marker at index i (more
    may follow: unlabelled markers); the axes ``frame``; hard ``obstacles``. -> per label its
    (slot, box), or None when dropped. Label 0 is never None. A leader line may not cross label
    0; among the free slots, the one covering the fewest other markers and crossing the fewest
    placed labels wins, then the earliest."""
    placed: list[tuple[Slot, Box] | None] = []
    taken: list[Box] = []
    blocked = [*obstacles, *marker_boxes[:1]]  # no label but the first covers the first marker
    for i, (anchor, size, pad, slot_list) in enumerate(zip(anchors_px, sizes_px, pads_px, slot_lists)):
        boxes = [label_box(anchor, size, s, px_per_pt, pad) for s in slot_list]
        covered = [sum(overlaps(b, m) for j, m in enumerate(marker_boxes) if j != i) for b in boxes]
        ends = [(anchor[0] + s.dx_pt * px_per_pt, anchor[1] + s.dy_pt * px_per_pt) for s in slot_list]
        if i == 0:  # always placed: the least bad slot
            cost = [(not inside(b, frame), sum(overlaps(b, o) for o in obstacles), c, k)
                    for k, (b, c) in enumerate(zip(boxes, covered))]
            k = min(cost)[-1]
        else:
            free = [(c + sum(crosses(anchor, e, t) for t in taken[1:]) if s.leader else c, k)
                    for k, (b, c, e, s) in enumerate(zip(boxes, covered, ends, slot_list))
                    if inside(b, frame) and not any(overlaps(b, o) for o in (*taken, *blocked))
                    and not (s.leader and crosses(anchor, e, taken[0]))]
            if not free:
                placed.append(None)
                continue
            k = min(free)[1]
        placed.append((slot_list[k], boxes[k]))
        taken.append(boxes[k])
    return placed


def measure(fig: Figure, renderer: RendererBase, texts: Sequence[str], **text_kw) -> np.ndarray:
    """(n, 2) rendered sizes (w, h) in display pixels of ``texts`` drawn with ``text_kw``."""
    out = np.zeros((len(texts), 2))
    for i, s in enumerate(texts):
        t = Text(0, 0, s, **text_kw)
        t.set_figure(fig)
        extent = t.get_window_extent(renderer)
        out[i] = extent.width, extent.height
    return out
