"""A version names one set of weights forever: how a restarted learner numbers its versions."""

from __future__ import annotations

from learner.checkpoint import Lineage, read_published, record_published, resume_lineage
from protocol.config import load_config


def test_a_clean_resume_continues_the_checkpoint_version():
    assert resume_lineage(Lineage(100, 100, 0), (100, 0)) == Lineage(100, 100, 0)
    assert resume_lineage(Lineage(0, 0, 0), None) == Lineage(0, 0, 0)


def test_versions_published_after_the_checkpoint_are_never_reused():
    # killed at v193, resumed from the v100 checkpoint: versions 101..193 named discarded weights
    got = resume_lineage(Lineage(100, 100, 0), (193, 0))
    assert got == Lineage(version=194, step=100, floor=194)
    # no checkpoint at all (checkpoint_every=0): the initial weights get a fresh number too
    assert resume_lineage(Lineage(), (40, 0)) == Lineage(41, 0, 41)


def test_the_floor_survives_a_second_restart():
    first = resume_lineage(Lineage(100, 100, 0), (193, 0))  # 194, step 100, floor 194
    # trained on to v250 (step 156), checkpointed there, killed right after: nothing was discarded this time
    assert resume_lineage(Lineage(250, 156, first.floor), (250, first.floor)) == Lineage(250, 156, 194)


def test_published_record_round_trips(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    assert read_published(cfg) is None
    record_published(cfg, 7, 3)
    record_published(cfg, 8, 3)
    assert read_published(cfg) == (8, 3)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
