"""The Makefile's install step prints nothing when all goes well (pip's --quiet is not enough alone)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _editable_install_line() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / "Makefile").read_text().splitlines() if "-e '.[dev]'" in ln]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_the_editable_install_prints_no_setuptools_banner(tmp_path):
    """The Makefile's `pip install -e` line, run as written (its environment and flags) on a copy of
    the project's layout, offline into a temp prefix: setuptools' 'Editable installation' note,
    which pip relays as a warning even with --quiet, does not reach the terminal."""
    words = _editable_install_line()
    env_words = [w for w in words[: words.index("$(BIN)/python")] if "=" in w]
    assert "--quiet" in words
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "README.md", project / "README.md")
    # The copy gets a name of its own: pip would otherwise uninstall this venv's editable hierloc
    # before installing the copy into the temp prefix (it removes a same-named distribution first).
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '\nname = "hierloc"\n' in pyproject
    (project / "pyproject.toml").write_text(pyproject.replace('\nname = "hierloc"\n', '\nname = "hierloc-install-check"\n', 1))
    for pkg in ("hierloc", "geodata", "flows"):  # the layout decides setuptools' editable strategy
        (project / pkg).mkdir()
        (project / pkg / "__init__.py").write_text("")
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           **dict(w.split("=", 1) for w in env_words)}
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--prefix", str(tmp_path / "prefix"), "-e", str(project)],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout + res.stderr == ""
    assert list((tmp_path / "prefix").rglob("__editable__*hierloc_install_check*.pth"))  # it did install
