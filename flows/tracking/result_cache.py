"""Cached task results are JSON, and only JSON is ever read back.

The cached stages persist their results with ``RESULT_SERIALIZER``: Prefect's JSON serializer
with no object decoder (the results are plain dicts of paths and digests). Prefect reads a
result record with the serializer the record itself describes, so a record that names pickle,
or a JSON serializer with another library or object decoder (Prefect imports and calls the
functions named there), would run code when its cache key comes up. ``JsonRecordsOnly`` wraps
a cache policy: before Prefect looks the key up, a local record under that key whose
serializer is not exactly ``RESULT_SERIALIZER`` (or that is not a regular file) is renamed
aside (``<key>.refused``, kept for inspection, never read), and the task runs again.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.serializers import JSONSerializer

#: What the cached stages write and the only serializer read back: plain JSON, nothing imported.
RESULT_SERIALIZER = JSONSerializer(object_decoder=None)
log = logging.getLogger(__name__)
#: the stages' results are small dicts of paths and digests; a larger record is not one of ours
MAX_RECORD_BYTES = 16 << 20


def record_serializer(path: Path) -> dict | None:
    """The serializer a Prefect result record file describes (its whole settings: type,
    library, decoder...), read as plain JSON (its result is not decoded); None when the file is
    not a JSON record (or is larger than MAX_RECORD_BYTES: it is not read)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_RECORD_BYTES + 1)
        if len(data) > MAX_RECORD_BYTES:
            return None
        doc = json.loads(data)
        meta = doc["metadata"] if "metadata" in doc else doc  # a whole record, or its metadata alone (key storage)
        return dict(meta["serializer"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_path(task_ctx, key: str) -> Path | None:
    store = getattr(task_ctx, "result_store", None)
    storage = getattr(store, "metadata_storage", None) or getattr(store, "result_storage", None)
    if storage is None:
        from prefect.results import get_default_result_storage

        storage = get_default_result_storage(_sync=True)
    resolve = getattr(storage, "_resolve_path", None)  # local file systems only; a remote store is not checked
    return Path(resolve(key)) if resolve is not None else None


@dataclass
class JsonRecordsOnly(CachePolicy):
    """``policy``'s cache key, with any local record under that key not written by
    RESULT_SERIALIZER set aside first."""

    policy: CachePolicy | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs) if self.policy else None
        path = _record_path(task_ctx, key) if key else None
        if path is not None and (path.exists() or path.is_symlink()):
            # a link or a special file (a FIFO would hang the read) is no record of ours either
            kind = record_serializer(path) if stat.S_ISREG(os.lstat(path).st_mode) else "not a regular file"
            if kind != RESULT_SERIALIZER.model_dump():
                os.replace(path, path.with_name(path.name + ".refused"))
                log.warning("cached result %s is not a plain JSON record of ours (serializer %s): set aside as "
                            "%s.refused, never read; the task runs again", path, kind, path.name)
        return key
