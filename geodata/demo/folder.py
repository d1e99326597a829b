"""Which folders the demo builder may write to: its own (marked), empty or absent ones.

A user's data folder is never written to and nothing in it is ever deleted: the builder
(geodata.demo.build) first claims its target, which must be absent, empty, already marked
by an earlier build, or explicitly claimed (the project's own demo folder).
"""

from __future__ import annotations

from pathlib import Path

from geodata.atomic import write_text_atomic

#: Written first into every folder build_demo_dataset fills: only such a folder (or an empty
#: or absent one) is ever written to again, and only there are stale shards removed.
DEMO_MARKER = ".hierloc-demo"


class ForeignFolderError(ValueError):
    """The target folder holds files that build_demo_dataset did not write."""


def owns_folder(out_dir: Path) -> bool:
    """True when ``out_dir`` was filled by build_demo_dataset (it holds DEMO_MARKER)."""
    return (Path(out_dir) / DEMO_MARKER).is_file()


def claim_folder(out_dir: Path, *, claim: bool = False) -> None:
    """Mark ``out_dir`` as the demo's (creating it) if it is absent, empty or already ours, or
    ``claim`` (the project's own demo folder); else raise ForeignFolderError: never written to."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ForeignFolderError(f"{out_dir} is not a folder: refusing to write the demo dataset there")
    if not claim and out_dir.is_dir() and not owns_folder(out_dir):
        held = sorted(p.name for p in out_dir.iterdir())
        if held:
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            raise ForeignFolderError(
                f"{out_dir} is not empty ({shown}) and holds no {DEMO_MARKER} marker: it was not written by "
                "the demo builder, so nothing is written into it; give an empty or new folder")
    write_text_atomic("written by geodata.demo.build.build_demo_dataset: it may rewrite this folder\n",
                      out_dir / DEMO_MARKER)
