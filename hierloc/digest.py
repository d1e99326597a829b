"""The one digest of a configuration (or any JSON-able object): what keys checkpoints, run folders
and the pipeline's stage caches. Its bytes are a format: changing them orphans every checkpoint."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest_of(obj: Any) -> str:
    """16 hex digits of the sha256 of ``obj`` as sorted-key JSON (``str()`` for what JSON lacks).

    Key order never matters; a list and a tuple of the same items give the same digest.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
