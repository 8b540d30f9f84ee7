"""`podsrl run`'s progress output: a live line on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.launch import Progress
from protocol.config import load_config


def write(path, steps) -> None:
    with path.open("a") as f:
        for s in steps:
            f.write(
                json.dumps(
                    {
                        "step": s,
                        "train/step": s,
                        "time": 100.0 + 2 * s,
                        "reward/mean": s / 10,
                        "staleness/mean": 1.0,
                        "staleness/max": 2,
                        "train/samples_per_s": 100.0,
                    }
                )
                + "\n"
            )


def make(tmp_path: Path, live: bool, every_s: float = 3600.0) -> tuple[Progress, Path]:
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.steps=5"])
    (tmp_path / "metrics").mkdir()
    return Progress(cfg, live=live, every_s=every_s), tmp_path / "metrics" / "learner.jsonl"


def test_plain_output_prints_the_first_line_then_only_every_interval_and_the_last(tmp_path, capsys):
    progress, path = make(tmp_path, live=False)
    write(path, [1, 2])
    progress.poll()
    write(path, [3, 4])
    progress.poll()  # within the interval: nothing
    write(path, [5])
    progress.poll()  # the last step: always
    progress.finish()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["2/5", "5/5"]
    assert lines[0].endswith("ETA    6s")  # 2 s per step (the records' own clock), 3 steps to go
    assert "reward 0.500" in lines[-1] and "ETA" in lines[-1] and "\r" not in "".join(lines)
    assert progress.rewards == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_live_output_rewrites_one_line_and_ends_it(tmp_path, capsys):
    progress, path = make(tmp_path, live=True)
    for s in range(1, 4):
        write(path, [s])
        progress.poll()
    progress.finish()  # stopped at step 3 of 5: the line is ended before the summary
    out = capsys.readouterr().out
    assert out.count("\r") == 3 and out.endswith("\n") and out.count("\n") == 1
    assert "[############--------]" in out.split("\r")[-1]  # 3 of 5 steps


def screen(out: str) -> list[str]:
    """What a terminal shows after ``out``: ``\\r`` returns to the line's start, later text overwrites."""
    lines, col = [""], 0
    for ch in out:
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("")
            col = 0
        else:
            lines[-1] = lines[-1][:col] + ch + lines[-1][col + 1 :]
            col += 1
    return lines


def test_a_shorter_live_line_leaves_nothing_of_the_longer_one(tmp_path, capsys):
    progress, path = make(tmp_path, live=True)
    with path.open("a") as f:  # staleness/max 10, then 2: the line is one character shorter
        for s, worst in ((1, 10), (2, 10), (3, 2)):
            f.write(json.dumps({"step": s, "time": 100.0 + 2 * s, "reward/mean": 0.5, "staleness/max": worst}) + "\n")
            f.flush()
            progress.poll()
    progress.finish()
    out = capsys.readouterr().out
    last = out.split("\r")[-1].rstrip()
    assert "(max 2," in last and [line.rstrip() for line in screen(out)] == [last, ""]  # not "ETA    4ss"
