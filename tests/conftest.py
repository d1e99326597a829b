"""Where the real OSV-5M sample lies: $HIERLOC_OSV5M_SAMPLE, else ../shared/osv5m-sample
beside the checkout (as on developers' machines and in CI). Tests read the env var."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    if "HIERLOC_OSV5M_SAMPLE" not in os.environ:
        candidates = [ROOT.parent / "shared" / "osv5m-sample", ROOT / "shared" / "osv5m-sample"]
        found = next((c for c in candidates if (c / "select.csv").exists()), candidates[0])
        os.environ["HIERLOC_OSV5M_SAMPLE"] = str(found)
