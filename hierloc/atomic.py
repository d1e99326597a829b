"""Atomic file writes for hierloc (checkpoints, models, feature shards).

The same mechanism as geodata.atomic, which hierloc cannot import (the layers are
one-way): a temporary name in the destination's folder, then ``os.replace``; on any
error the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (its folder created); on success move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
