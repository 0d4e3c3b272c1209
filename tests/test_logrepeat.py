"""Repeated identical log lines are written once per window, then summarised (fake time)."""

from __future__ import annotations

import logging

import pytest

from masqd.logrepeat import ALWAYS, RepeatFilter, install


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@pytest.fixture
def rig() -> tuple[logging.Logger, Collect, FakeClock]:
    clock = FakeClock()
    handler = Collect()
    handler.addFilter(RepeatFilter(handler, window=10.0, max_lines=3, clock=clock))
    logger = logging.Logger("masqd.test")  # not registered: no other handlers
    logger.addHandler(handler)
    return logger, handler, clock


def test_a_line_repeated_within_the_window_is_written_once_then_summarised(
    rig: tuple[logging.Logger, Collect, FakeClock],
) -> None:
    logger, handler, clock = rig
    for _ in range(1000):
        logger.error("sync failed: %s", "Too many open files")
        clock.now += 0.001
    assert handler.lines == ["ERROR masqd.test: sync failed: Too many open files"]

    clock.now += 10.0
    logger.error("sync failed: %s", "Too many open files")
    assert handler.lines[1:] == [
        "ERROR masqd.test: repeated 999 more times in the last 11s: "
        "sync failed: Too many open files",
        "ERROR masqd.test: sync failed: Too many open files",
    ]


def test_any_later_record_brings_out_the_summary_of_a_line_that_stopped(
    rig: tuple[logging.Logger, Collect, FakeClock],
) -> None:
    logger, handler, clock = rig
    for _ in range(5):
        logger.warning("cannot accept: EMFILE")
    clock.now += 30.0
    logger.info("ready")
    assert handler.lines == [
        "WARNING masqd.test: cannot accept: EMFILE",
        "WARNING masqd.test: repeated 4 more times in the last 30s: cannot accept: EMFILE",
        "INFO masqd.test: ready",
    ]


def test_different_text_level_or_logger_is_another_line(
    rig: tuple[logging.Logger, Collect, FakeClock],
) -> None:
    logger, handler, _ = rig
    other = logging.Logger("masqd.other")
    other.addHandler(handler)
    logger.error("a")
    logger.error("b")
    logger.warning("a")
    other.error("a")
    assert handler.lines == [
        "ERROR masqd.test: a",
        "ERROR masqd.test: b",
        "WARNING masqd.test: a",
        "ERROR masqd.other: a",
    ]


def test_a_line_seen_once_needs_no_summary(rig: tuple[logging.Logger, Collect, FakeClock]) -> None:
    logger, handler, clock = rig
    logger.error("once")
    clock.now += 60.0
    logger.error("once")
    assert handler.lines == ["ERROR masqd.test: once", "ERROR masqd.test: once"]


def test_beyond_max_lines_the_oldest_is_summarised_and_forgotten(
    rig: tuple[logging.Logger, Collect, FakeClock],
) -> None:
    logger, handler, _ = rig
    logger.error("l0")
    logger.error("l0")
    for n in range(1, 4):  # the fourth distinct line pushes out the first (max_lines=3)
        logger.error("l%d", n)
    assert "ERROR masqd.test: repeated 1 more times in the last 0s: l0" in handler.lines
    logger.error("l0")  # forgotten, so written again
    assert handler.lines[-1] == "ERROR masqd.test: l0"


def test_install_covers_every_logger_through_the_root_handlers() -> None:
    handler = Collect()
    install([handler], window=60.0)
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "accept failed", (), None)
    for _ in range(50):
        handler.handle(record)
    assert handler.lines == ["ERROR asyncio: accept failed"]


def test_a_line_marked_always_is_never_held_back(
    rig: tuple[logging.Logger, Collect, FakeClock],
) -> None:
    logger, handler, clock = rig
    for _ in range(3):  # three ConfigMap updates a second apart: each one is news
        logger.info("config file changed: policy applied to table inet masqd", extra=ALWAYS)
        clock.now += 1.0
    assert (
        handler.lines
        == ["INFO masqd.test: config file changed: policy applied to table inet masqd"] * 3
    )
