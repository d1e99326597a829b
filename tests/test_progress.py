"""The one progress mechanism (hierloc/progress.py, its twin geodata/progress.py): a bar on a
terminal, log lines elsewhere at most every ``every_s`` seconds, the same figures in both.
A fake clock drives the log form: nothing sleeps."""

import io
import logging
from pathlib import Path

import pytest

from geodata import progress as geodata_progress
from hierloc import progress as hierloc_progress

ROOT = Path(__file__).resolve().parents[1]
MODULES = [hierloc_progress, geodata_progress]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_two_layers_hold_the_same_file():
    assert (ROOT / "hierloc" / "progress.py").read_bytes() == (ROOT / "geodata" / "progress.py").read_bytes()


@pytest.mark.parametrize("mod", MODULES, ids=["hierloc", "geodata"])
def test_not_a_terminal_logs_a_line_per_interval_with_done_rate_and_eta(mod, caplog):
    clock, logger = FakeClock(), logging.getLogger("hierloc.test_progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    stream = io.StringIO()
    p = mod.Progress(100, "epoch 3/20", unit="steps", items_unit="samples", logger=logger, every_s=10,
                     stream=stream, clock=clock)
    for _ in range(20):  # 20 steps of 32 samples, 0.5 s each: one line, at 10 s
        clock.t += 0.5
        p.update(1, items=32)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 3/20: 20/100 steps (20%), 2.0 steps/s, 64.0 samples/s, ETA 40 s"]
    for _ in range(19):  # 9.5 s more: no new line (at most one per 10 s)
        clock.t += 0.5
        p.update(1, items=32)
    assert len(caplog.records) == 1
    clock.t += 0.5
    p.update(61, items=61 * 32)
    assert caplog.records[-1].getMessage() == "epoch 3/20: 100/100 steps (100%), 5.0 steps/s, 160 samples/s, ETA 0 s"
    clock.t += 5
    p.close()
    p.close()  # once
    assert caplog.records[-1].getMessage() == "epoch 3/20: 100/100 steps in 25 s (4.0 steps/s, 128 samples/s)"
    assert len(caplog.records) == 3 and stream.getvalue() == ""  # nothing drawn


@pytest.mark.parametrize("mod", MODULES, ids=["hierloc", "geodata"])
def test_a_step_shorter_than_the_interval_writes_nothing(mod, caplog):
    clock, logger = FakeClock(), logging.getLogger("geodata.test_progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    with mod.Progress(10, "quick", logger=logger, every_s=10, stream=io.StringIO(), clock=clock) as p:
        for _ in range(10):
            clock.t += 0.9
            p.update()
    assert caplog.records == []


@pytest.mark.parametrize("mod", MODULES, ids=["hierloc", "geodata"])
def test_unknown_total_and_long_times(mod, caplog):
    clock, logger = FakeClock(), logging.getLogger("geodata.test_progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    p = mod.Progress(None, "reading", unit="MB", logger=logger, every_s=0, stream=io.StringIO(), clock=clock)
    clock.t += 4
    p.update(2.5)
    assert caplog.records[-1].getMessage() == "reading: 2.5 MB, 0.62 MB/s"
    p = mod.Progress(1_000_000, "labelling", unit="rows", logger=logger, every_s=0, stream=io.StringIO(), clock=clock)
    clock.t += 125
    p.update(50_000)
    assert caplog.records[-1].getMessage() == "labelling: 50,000/1,000,000 rows (5%), 400 rows/s, ETA 39 min 35 s"
    assert mod.format_seconds(3725) == "1 h 02 min"


@pytest.mark.parametrize("mod", MODULES, ids=["hierloc", "geodata"])
def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(mod, caplog):
    logger = logging.getLogger("hierloc.test_progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    term = Terminal()
    with mod.Progress(8, "features", unit="img", items_unit="samples", logger=logger, every_s=0, stream=term,
                      delay_s=0) as p:
        for _ in range(8):
            p.update(1, items=4)
    out = term.getvalue()
    assert "features: 100%" in out and "8/8" in out and "img/s" in out and "samples/s" in out
    assert caplog.records == []


@pytest.mark.parametrize("mod", MODULES, ids=["hierloc", "geodata"])
def test_the_interval_comes_from_the_environment(mod, monkeypatch, caplog):
    logger = logging.getLogger("hierloc.test_progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    monkeypatch.setenv(mod.ENV_EVERY_S, "0")
    p = mod.Progress(3, "x", logger=logger, stream=io.StringIO())
    p.update()
    p.update()
    assert len(caplog.records) == 2
    monkeypatch.setenv(mod.ENV_EVERY_S, "")
    assert mod.every_s_from_env() == mod.DEFAULT_EVERY_S
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(mod.ENV_EVERY_S, bad)
        with pytest.raises(ValueError, match=f"HIERLOC_PROGRESS_EVERY_S={bad!r}"):
            mod.every_s_from_env()


@pytest.mark.parametrize("mod", MODULES, ids=["hierloc", "geodata"])
def test_bytes_are_shown_in_kb_mb_gb(mod, caplog):
    clock, logger = FakeClock(), logging.getLogger("geodata.test_progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    p = mod.Progress(2_620_000_000, "reading train.csv", unit="B", items_unit="rows", logger=logger, every_s=0,
                     stream=io.StringIO(), clock=clock)
    clock.t += 20
    p.update(1_200_000_000, items=2_250_000)
    assert caplog.records[-1].getMessage() == ("reading train.csv: 1.2 GB/2.62 GB (46%), 60 MB/s, 112,500 rows/s, "
                                               "ETA 24 s")
    term = Terminal()
    with mod.Progress(2_000_000, "reading", unit="B", logger=logger, stream=term, delay_s=0) as bar:
        bar.update(2_000_000)
    assert "2.00M/2.00M" in term.getvalue() and "B/s" in term.getvalue()
