"""`hierloc label` on a CSV that is not UTF-8: the error names the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from geodata.labels.geonames_csv import label_csv


def _latin1_csv(path: Path) -> Path:
    # Line 3 holds a Latin-1 'é' (0xe9); the other lines are plain UTF-8.
    path.write_bytes(b"id,latitude,longitude,note\n1,48.85,2.35,Paris\n2,45.76,4.83,caf\xe9\n3,43.3,5.37,x\n")
    return path


@pytest.mark.parametrize("method", ["geonames", "polygons"])
def test_label_names_file_and_line_of_a_byte_that_is_not_utf8(tmp_path: Path, method: str) -> None:
    src = _latin1_csv(tmp_path / "points.csv")
    res = CliRunner().invoke(app, ["label", str(src), str(tmp_path / "out.csv"), "--method", method],
                             catch_exceptions=False)
    assert res.exit_code == 2
    assert f"error: {src}, line 3: byte 0xe9 is not UTF-8" in res.stderr
    assert not (tmp_path / "out.csv").exists()


def test_label_csv_raises_value_error_naming_file_and_line(tmp_path: Path) -> None:
    src = _latin1_csv(tmp_path / "points.csv")
    with pytest.raises(ValueError, match=rf"^{src}, line 3: byte 0xe9 is not UTF-8"):
        label_csv(src, tmp_path / "out.csv")
