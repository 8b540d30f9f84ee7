"""The selector and the learner raise their limit of open files to what selector.max_peers servers need
(protocol/limits.py), in a child process whose limits are set as a system would set them."""

from __future__ import annotations

import resource
import subprocess
import sys

from helpers import ROOT, child_env

from protocol.limits import SPARE, open_files_needed

PROBE = (
    "import logging, resource, sys; logging.basicConfig(level=logging.INFO); "
    "from protocol.cli import configure, process_parser; "
    "configure(process_parser('x', None).parse_args(sys.argv[2:]), role=sys.argv[1]); "
    "print('soft', resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
)


def run_with_limits(role: str, soft: int, hard: int, *overrides: str) -> tuple[int, str]:
    """(soft limit after configure, stderr) of a process started under ``soft`` / ``hard`` open files."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    res = subprocess.run(
        [sys.executable, "-c", PROBE, role, *overrides],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1]), res.stderr


def hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def test_the_needs_follow_the_role() -> None:
    assert open_files_needed("selector", 3000) == 3000 + SPARE
    assert open_files_needed("learner-0", 3000) == 6000 + SPARE  # announce and weights connections
    assert open_files_needed("learner-1", 3000) == open_files_needed("rollout-a", 3000) == 0


def test_the_selector_raises_its_soft_limit_to_fit_max_peers() -> None:
    need = 3000 + SPARE
    assert hard_limit() >= need, "this machine's hard limit is too low for the test"
    soft, err = run_with_limits("selector", 1024, hard_limit(), "selector.max_peers=3000")
    assert soft == need and "open files" not in err


def test_a_limit_already_high_enough_is_kept() -> None:
    soft, _ = run_with_limits("selector", 2048, hard_limit())  # max_peers 256 by default: 320 needed
    assert soft == 2048


def test_a_hard_limit_too_low_is_said_with_the_fix() -> None:
    soft, err = run_with_limits("learner-0", 256, 1024, "selector.max_peers=3000")
    assert soft == 1024
    assert "at most 1024 open files (hard limit), the learner-0 with selector.max_peers=3000 needs 6064" in err
    assert "ulimit -n 6064" in err and "lower selector.max_peers" in err
