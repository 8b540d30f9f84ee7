"""Pacing end to end: a throttled rollout server, and the run's accounting reconciled with the audit trail."""

from __future__ import annotations

import threading
from collections import Counter

from test_pipeline import assert_all_exited, podsrl_run

from bench.pacing import duty_cycle
from launcher.accounting import account, trained_per_server
from protocol.metrics import read_metrics


def test_a_throttled_server_is_paced_and_every_count_reconciles(run_dir, net_overrides):
    """rollout-1 is SIGSTOPped 70 ms of every 100 ms. The learner's audit trail (the truth of what was
    trained) agrees with the selector's and the servers' own counts; no group is trained twice or
    beyond K; and pacing keeps what is generated and never trained small."""
    k = 2
    done = threading.Event()
    cycler = threading.Thread(target=duty_cycle, args=(run_dir, "rollout-1", 0.07, 0.1, done), daemon=True)
    cycler.start()
    try:
        res = podsrl_run(run_dir, [f"max_staleness={k}", "run.steps=150", *net_overrides])
    finally:
        done.set()
        cycler.join()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_all_exited(run_dir)
    metrics = run_dir / "metrics"
    records = read_metrics(metrics / "trained_groups.jsonl")
    audit = [tuple(g) for r in records for g in r["groups"]]
    versions = [r["version"] for r in records]
    assert len(versions) == 150
    assert len({g[:3] for g in audit}) == len(audit) == 150 * 8, "a group was trained twice, or a batch was short"
    assert max(m["staleness/max"] for m in read_metrics(metrics / "learner.jsonl")) <= k

    acc = account(run_dir)
    totals = {k: v for k, v in read_metrics(metrics / "selector.jsonl")[-1].items() if k.startswith("total/")}
    trained = trained_per_server(metrics / "trained_groups.jsonl")
    assert trained == Counter(g[0] for g in audit) and set(acc.servers) == {"rollout-0", "rollout-1"}
    for name, s in acc.servers.items():
        assert s.counted_by_server, f"{name} left no total/groups_sent"
        assert s.trained == trained[name] == totals.get(f"total/groups/trained/{name}", 0)
        # every group a server sent was received (or still in flight at the end); none trained unsent
        assert s.trained <= s.received <= s.generated <= s.received + 8
        assert s.stale == totals.get(f"total/staleness/dropped/{name}", 0)
    assert acc.trained == 150 * 8 == totals["total/groups/trained"]
    assert acc.waste < 0.10, acc.lines()  # about (K+1) batches are buffered or in flight when the run ends
    assert acc.servers["rollout-1"].idle_s > 0 or acc.servers["rollout-0"].idle_s > 0, "nobody was ever paced"
    assert "podsrl run: generated" in res.stdout and "share ratio" in res.stdout
