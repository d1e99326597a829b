"""What a pipeline's data folder holds, and the one case where the demo data is built into it.

A data folder holds the OSV-5M release layout (``train.csv``, ``test.csv``, ``images/``), or
the WebDataset copy (``train/**/*.tar``, ``test/**/*.tar``; geodata.ingest.webdataset). The
embedded demo data is built only into the project's own demo folder (flows.settings.
DEMO_DATA_DIR), into an earlier demo build (geodata.demo.folder's marker) or into an
empty or absent folder: a user's folder is never written to. Any other folder without
either layout is an error that names the folder, what was looked for and what it holds.
"""

from __future__ import annotations

from pathlib import Path

from geodata.demo.folder import owns_folder

SPLITS = ("train", "test")


class DataDirError(ValueError):
    """The data folder holds neither layout, and the demo data may not be built there."""


def found_layout(root: Path, layout: str = "auto") -> str | None:
    """'csv' or 'webdataset' when ``root`` holds that layout's training split (as ingest's
    ``layout=auto`` reads it), else None. An explicit ``layout`` is checked alone."""
    root = Path(root)
    if layout in ("auto", "csv") and (root / f"{SPLITS[0]}.csv").is_file():
        return "csv"
    split = root / SPLITS[0]
    if layout in ("auto", "webdataset") and split.is_dir() and any(p.is_file() for p in split.rglob("*.tar")):
        return "webdataset"
    return None


def _is_demo_dir(root: Path) -> bool:
    from flows import settings  # read at call time: tests point it elsewhere

    return root.resolve() == Path(settings.DEMO_DATA_DIR).resolve()


def _empty_or_absent(root: Path) -> bool:
    return not root.exists() or (root.is_dir() and not any(root.iterdir()))


def _wanted(layout: str) -> str:
    looked = {"csv": "train.csv and test.csv (the OSV-5M release layout)",
              "webdataset": "train/*.tar and test/*.tar (the WebDataset copy)"}
    return " or ".join(v for k, v in looked.items() if layout in ("auto", k))


def _held(root: Path) -> str:
    """What the folder holds, in a few words (its first 8 names)."""
    if not root.exists():
        return "it does not exist"
    if not root.is_dir():
        return "it is not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    return "it holds " + (", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
                          if names else "nothing")


def demo_target(root: Path, layout: str = "auto", build_if_missing: bool = True) -> bool | None:
    """None: ``root`` holds the data (no demo needed). True / False: build the demo there,
    claiming the folder (True: the project's demo folder) or not (False: empty, absent or an
    earlier build). Raises DataDirError for any other folder, naming what was looked for."""
    root = Path(root)
    if found_layout(root, layout) is not None:
        return None
    if build_if_missing and layout != "webdataset":
        if _is_demo_dir(root):
            return True
        if _empty_or_absent(root) or owns_folder(root):
            return False
    why = "" if not build_if_missing or layout == "webdataset" else (
        "; the embedded demo data is built only into the project's demo folder or an empty or absent folder, "
        "so nothing was written here")
    raise DataDirError(f"data folder {root}: found neither layout: looked for {_wanted(layout)}; {_held(root)}{why}")


def check_heldout_target(root: Path, heldout_km: float | None) -> None:
    """A held-out demo build (heldout_km set) never goes into the project's demo folder: the
    default demo (the README's numbers) is never overwritten by it. Raises DataDirError."""
    if heldout_km is not None and _is_demo_dir(Path(root)):
        raise DataDirError(f"data folder {root} is the default demo's: the held-out split (heldout_km={heldout_km}) "
                           "goes in a folder of its own, e.g. data/demo-heldout")


def check_heldout_data(root: Path, heldout_km: float | None) -> None:
    """A folder that already holds demo data must hold the split asked for: with heldout_km set,
    its heldout.json must record that distance. Raises DataDirError naming both."""
    from geodata.demo.heldout import HELDOUT_FILE, recorded_heldout_km

    if heldout_km is None:
        return
    recorded = recorded_heldout_km(Path(root))
    if recorded != float(heldout_km):
        held = "a random (not held-out) split" if recorded is None else f"a held-out split at {recorded} km"
        raise DataDirError(f"data folder {root} holds {held} ({HELDOUT_FILE}), but demo_data.heldout_km is "
                           f"{heldout_km}: give an empty or new data_dir, or rebuild it with "
                           f"`hierloc demo-data --out {root} --heldout-km {heldout_km}`")
