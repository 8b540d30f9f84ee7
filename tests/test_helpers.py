"""The waiting helpers every test that synchronises with another process or thread uses (helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import line_matching, wait_for


def test_wait_for_returns_the_first_truthy_value() -> None:
    calls: list[int] = []

    def third() -> int | None:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else None

    assert wait_for(third, 5, "the third call", every_s=0) == 3
    assert wait_for(lambda: "now", 0, "something already true") == "now"


def test_wait_for_names_what_it_waited_for_and_shows_the_detail() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0.05s waiting for the moon\nstill dark"):
        wait_for(lambda: False, 0.05, "the moon", every_s=0.01, detail=lambda: "still dark")


def test_a_predicate_that_raises_fails_at_once() -> None:
    def dead() -> bool:
        raise AssertionError("the process died")

    with pytest.raises(AssertionError, match="the process died"):
        wait_for(dead, 60, "a dead process")


def test_line_matching_reads_complete_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    assert line_matching(log, "up") is None  # no file yet
    log.write_text("starting\nserver up: port 5\nserver up: port 6")
    assert line_matching(log, r"up: port \d") == "server up: port 5"
    assert line_matching(log, "port 6") is None  # still being written
    assert line_matching(log, "down") is None
