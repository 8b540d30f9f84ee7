"""The learning suite's small CPU tasks (issue 20): configs/add2.toml and configs/countdown3.toml. Their
generated datasets, their rewards on known answers, and `podsrl check` passing on each config."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ROOT

from launcher.preflight import preflight
from protocol.config import load_config
from rollout_server.tasks.rewards import load_reward
from rollout_server.tasks.verifiers import char_match_strict, countdown


def example(name: str) -> ModuleType:
    """An example's ``make_<name>.py``, loaded from its file as `python examples/<name>/make_<name>.py` runs it."""
    spec = importlib.util.spec_from_file_location(f"make_{name}", ROOT / "examples" / name / f"make_{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shape = load_reward(str(ROOT / "examples" / "countdown3" / "countdown3_rewards.py") + ":countdown_shape")


def test_add2_rows_are_every_two_digit_sum_zero_padded() -> None:
    rows = example("add2").rows()
    assert len(rows) == 90 * 90 and rows == example("add2").rows()
    for row in rows:
        a, b = map(int, re.fullmatch(r"(\d\d)\+(\d\d)=", row["prompt"]).groups())  # type: ignore[union-attr]
        assert row["answer"] == f"{a + b:03d}" and len(row["answer"]) == 3
    assert {"prompt": "47+38=", "answer": "085"} in rows and {"prompt": "99+99=", "answer": "198"} in rows


def test_add2_reward_scores_known_answers() -> None:
    rows = [{"prompt": "47+38=", "answer": "085"}] * 5
    completions = ["085", "084", "85", "185", "0850"]
    scores = char_match_strict([r["prompt"] for r in rows], completions, [r["answer"] for r in rows])
    assert scores == [1.0, 2 / 3, 0.0, 2 / 3, 0.75]  # "85" is misaligned: no digit in place


def test_countdown3_rows_are_solvable_and_fixed() -> None:
    rows = example("countdown3").rows()
    assert rows == example("countdown3").rows()  # seeded: the same file on every run
    assert 400 <= len(rows) <= 495 and len({r["prompt"] for r in rows}) == len(rows)
    targets = {t for r in rows for t in [r["target"]]}
    assert min(targets) >= 1 and max(targets) <= 60 and len(targets) > 30
    for row in rows:
        a, b, c = row["numbers"]
        assert row["prompt"] == f"{a},{b},{c}->{row['target']}:" and 1 <= a <= b <= c <= 9
        assert re.fullmatch(r"\d[-+*]\d[-+*]\d", row["answer"])  # 5 characters: fills max_new_tokens
    scores = countdown([], [r["answer"] for r in rows], [r["numbers"] for r in rows], [r["target"] for r in rows])
    assert scores == [1.0] * len(rows)  # the built-in verifier agrees that every answer hits its target


def test_countdown3_reward_scores_known_answers() -> None:
    cases = [  # completion for the digits 3, 5, 7 and the target 22
        ("3*5+7", 1.0),
        ("7+5*3", 1.0),  # any order
        (" 3*5+7 ", 1.0),
        ("3+5+7", 0.4 + 0.6 * 0.3),  # the right digits, value 15: 7 away of a scale of 10
        ("3*7-5", 0.4 + 0.6 * 0.4),  # 16: 6 away
        ("3*5*7", 0.4),  # 105: too far for any value credit
        ("3*5+8", 0.4 * 2 / 3),  # two of the three digits, so no value credit
        ("3*5+", 0.4 * 2 / 3),  # does not parse
        ("357", 0.0),  # one literal, 357
        ("3*5+7+1", 0.4 * 3 / 4),  # a fourth number
        ("", 0.0),
        ("9" * 10_000, 0.0),  # hostile: over the parser's bound
        ("((((3))))*5+7", 1.0),
    ]
    n = len(cases)
    scores = shape([""] * n, [c for c, _ in cases], [[3, 5, 7]] * n, [22] * n)
    for (text, want), got in zip(cases, scores, strict=True):
        assert got == pytest.approx(want, abs=1e-12), text
    assert shape([""], ["1*1*1"], [[1, 1, 1]], [1]) == [1.0]  # repeated digits count as a multiset
    assert shape([""], ["1*1"], [[1, 1, 1]], [1]) == [pytest.approx(0.4 * 2 / 3)]


@pytest.mark.parametrize(("name", "reward"), [("add2", "char_match_strict 1"), ("countdown3", "countdown_shape 1")])
def test_podsrl_check_passes_on_the_config(
    name: str, reward: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config as shipped (its reward path is relative to the repository), on the data its generator
    writes; `podsrl check` scores 4 rows' answers: each must get the full reward."""
    monkeypatch.chdir(ROOT)
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in example(name).rows()))
    cfg = load_config(ROOT / "configs" / f"{name}.toml", [f"run.dir={tmp_path / 'run'}", f"task.dataset={data}"])
    assert cfg.max_new_tokens == max(len(r["answer"]) for r in example(name).rows())
    report = preflight(cfg)
    assert "built the tiny model" in report and f"rewards on 4 trial rows: {reward}" in report, report
