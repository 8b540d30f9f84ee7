"""The benchmarks still run (tiny sizes). They assert nothing about speed: that is what bench/ reports."""

import json
import math
import subprocess
import sys

import pytest
from helpers import ROOT, child_env


@pytest.mark.slow
def test_microbenchmarks_run_in_quick_mode():
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "codec", "selector", "rollout", "weights", "fleet"],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("[codec]", "[selector]", "[rollout]", "[weights]", "[fleet]"):
        assert name in res.stdout
    # the rollout bench measures every side of each comparison, and its paths really push and score groups
    rows = {
        r["case"].split(",")[0]: r
        for r in json.loads((ROOT / "bench" / "results-quick.json").read_text())["results"]
        if r["bench"] == "rollout"
    }
    for case in ("(a) server path", "(a2) text path vs token path", "(b) torch engine"):
        assert case in rows, sorted(rows)
        assert math.isfinite(rows[case]["value"]) and rows[case]["value"] > 0
        assert math.isfinite(rows[case]["peer_value"]) and rows[case]["peer_value"] > 0
    assert rows["(a) server path"]["extra"]["groups_received"] > 0
    text = rows["(a2) text path vs token path"]["extra"]
    assert all(text[f"{k}_ms_per_call"] > 0 for k in ("tokenize", "decode", "reward"))
    assert text["reward_agreement"] > 0.5  # the token path's credit on ids is the text reward's, bar special tokens
