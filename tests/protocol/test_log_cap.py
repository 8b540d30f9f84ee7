"""run.max_log_mib: a process that logs in a loop stops at the cap with one line saying so (issue 19)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LOGGER = """
import logging, sys
from protocol.cli import common_parser, configure
configure(common_parser().parse_args(sys.argv[1:]), role="test")
for i in range(2000):
    logging.getLogger("podsrl.test").warning("line %d %s", i, "x" * 100)
"""


def run_logger(tmp_path: Path, *overrides: str) -> str:
    log = tmp_path / "test.log"
    with log.open("w") as f:
        subprocess.run([sys.executable, "-c", LOGGER, *overrides], stderr=f, check=True, timeout=60)
    return log.read_text()


def test_a_log_stops_at_the_cap_with_one_line_saying_so(tmp_path):
    text = run_logger(tmp_path, "run.max_log_mib=0.1")  # ~260 kB of lines against a 100 KiB cap
    lines = text.splitlines()
    assert len(text.encode()) <= 0.1 * 2**20 + 200
    assert lines[-1] == "log capped at 0.1 MiB (run.max_log_mib): further lines dropped"
    assert lines[0].endswith("line 0 " + "x" * 100) and 700 < len(lines) < 800  # ~136-byte lines


def test_zero_is_unbounded(tmp_path):
    lines = run_logger(tmp_path, "run.max_log_mib=0").splitlines()
    assert len(lines) == 2000 and lines[-1].endswith("line 1999 " + "x" * 100)
