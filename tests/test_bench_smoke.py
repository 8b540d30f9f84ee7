"""The benchmarks still run (tiny sizes). They assert nothing about speed: that is what bench/ reports."""

import subprocess
import sys

import pytest
from helpers import ROOT, child_env


@pytest.mark.slow
def test_microbenchmarks_run_in_quick_mode():
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "codec", "selector", "rollout", "weights"],
                         cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("[codec]", "[selector]", "[rollout]", "[weights]"):
        assert name in res.stdout
