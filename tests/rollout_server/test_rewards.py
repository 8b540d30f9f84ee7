"""Reward functions: resolving task.reward, checking signatures, and the worker process that runs them."""

from __future__ import annotations

import functools
import logging
import math
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.config import BUILTIN_TASKS
from rollout_server.tasks import verifiers
from rollout_server.tasks.data import TaskError
from rollout_server.tasks.output import OutputBudget
from rollout_server.tasks.rewards import RewardFailure, RewardWorker, check_signature, load_reward
from rollout_server.tasks.verifiers import char_match, char_match_strict

TIMEOUT_S = 1.5

PLUGIN = '''
import os
import time

import numpy as np


def length(prompts, completions, **kw):
    """len(completion); None (does not score) for an empty completion."""
    return [float(len(c)) if c else None for c in completions]


def modes(prompts, completions, mode, **kw):
    """The `mode` column picks what this call does: hang, die, raise, return junk, or score."""
    if "sleep" in mode:
        time.sleep(3600)  # not a wait: the hung reward function that the worker's timeout must end
    if "exit" in mode:
        os._exit(3)
    if "raise" in mode:
        raise RuntimeError("the reward function failed on purpose")
    if "wrong_length" in mode:
        return [1.0]
    if "not_a_list" in mode:
        return 3.0
    values = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "str": "1.0", "bool": True,
              "np32": np.float32(0.25), "np64": np.float64(0.75), "npint": np.int64(2), "int": 4, "none": None,
              "big": 1e38, "-big": -1e38}
    return [len(c) / 10 if m == "ok" else values[m] for c, m in zip(completions, mode)]


def by_ids(prompts, completions, completion_ids):
    """Scores the sampled ids, not the text: the sum of the ids."""
    return [float(sum(ids)) for ids in completion_ids]


def echo_prompt(prompts, completions):
    return [float(len(p)) for p in prompts]


def loud(prompts, completions):
    """Prints 1 MB per call, half through sys.stdout and half straight to fd 2 (as a C library would)."""
    print("loud call")
    print("o" * 499_999)
    os.write(2, b"e" * 499_999 + b"\\n")
    return [float(len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module name of PLUGIN, importable here and in the spawned worker (sys.path travels with spawn)."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("plugin")
        (d / "podsrl_reward_plugin.py").write_text(PLUGIN)
        mp.syspath_prepend(str(d))
        yield "podsrl_reward_plugin"
        sys.modules.pop("podsrl_reward_plugin", None)


@pytest.fixture
def workers() -> Iterator[list[RewardWorker]]:
    """Workers made in a test are closed after it, even when it fails."""
    made: list[RewardWorker] = []
    yield made
    for w in made:
        w.close()


def new_worker(
    made: list[RewardWorker],
    specs: list[str],
    weights: list[float] | None = None,
    timeout_s: float = TIMEOUT_S,
    max_abs: float = math.inf,
    max_failures: int = 0,
    **kw: Any,
) -> RewardWorker:
    w = RewardWorker(specs, weights or [1.0] * len(specs), timeout_s, max_abs, max_failures, **kw)
    made.append(w)
    return w


def score(worker: RewardWorker, completions: list[str], mode: list[str] | None = None, **kw):
    columns = {"mode": mode} if mode is not None else {}
    ids = [[ord(ch) for ch in c] for c in completions]
    return worker.score(["p"] * len(completions), completions, ids, columns, **kw)


def write_module(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


# ---------------------------------------------------------------- load_reward


def test_builtin_names_resolve_to_their_functions():
    assert load_reward("copy") is char_match and load_reward("reverse") is char_match
    assert set(BUILTIN_TASKS) <= set(verifiers.BUILTIN_REWARDS)  # a built-in task's default reward is its type
    for name, fn in verifiers.BUILTIN_REWARDS.items():
        assert load_reward(name) is fn


def test_module_function_spec(tmp_path, monkeypatch):
    write_module(tmp_path, "podsrl_t_mod", "def f(prompts, completions, **kw):\n    return [7.0] * len(completions)\n")
    pkg = tmp_path / "podsrl_t_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write_module(pkg, "inner", "def g(prompts, completions):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("podsrl_t_mod", "podsrl_t_pkg", "podsrl_t_pkg.inner"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    f = load_reward("podsrl_t_mod:f")
    assert f(["p"], ["c"]) == [7.0] and f.__name__ == "f"
    assert load_reward("podsrl_t_pkg.inner:g")([], []) == [1.0]


def test_file_function_spec_absolute_and_relative(tmp_path, monkeypatch):
    path = write_module(tmp_path, "my_reward", "def score(prompts, completions, **kw):\n    return [0.5]\n")
    assert load_reward(f"{path}:score")([], []) == [0.5]
    monkeypatch.chdir(tmp_path)
    assert load_reward("my_reward.py:score")([], []) == [0.5]
    (tmp_path / "sub").mkdir()
    write_module(tmp_path / "sub", "other", "def h(prompts, completions):\n    return [2.0]\n")
    assert load_reward("sub/other.py:h")([], []) == [2.0]


def test_module_that_does_not_import(tmp_path, monkeypatch):
    write_module(tmp_path, "podsrl_t_broken", "import podsrl_no_such_dependency\ndef f(prompts, completions): ...\n")
    write_module(tmp_path, "podsrl_t_raises", "raise RuntimeError('config missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskError, match=r"importing podsrl_t_broken failed \(ModuleNotFoundError") as e:
        load_reward("podsrl_t_broken:f")
    assert "task.reward='podsrl_t_broken:f'" in str(e.value) and "PYTHONPATH" in str(e.value)
    with pytest.raises(TaskError, match=r"importing podsrl_t_raises failed \(RuntimeError: config missing\)"):
        load_reward("podsrl_t_raises:f")
    with pytest.raises(TaskError, match="importing podsrl_no_such_module failed"):
        load_reward("podsrl_no_such_module:f")
    bad = write_module(tmp_path, "syntax", "def f(:\n")
    with pytest.raises(TaskError, match=r"importing .*syntax\.py failed \(SyntaxError"):
        load_reward(f"{bad}:f")
    with pytest.raises(TaskError, match="does not exist"):
        load_reward(f"{tmp_path / 'absent.py'}:f")


def test_missing_or_non_callable_function(tmp_path):
    path = write_module(tmp_path, "mod", "NOT_A_FUNCTION = 3\ndef f(prompts, completions): ...\n")
    with pytest.raises(TaskError, match=r"has no function 'g'"):
        load_reward(f"{path}:g")
    with pytest.raises(TaskError, match=r"has no function 'NOT_A_FUNCTION'"):
        load_reward(f"{path}:NOT_A_FUNCTION")


@pytest.mark.parametrize("spec", ["not_a_builtin", "some.module", ":f", "some.module:", ""])
def test_bad_spec_string(spec):
    with pytest.raises(TaskError, match="neither a built-in") as e:
        load_reward(spec)
    assert "exact_match" in str(e.value) and "path/to/file.py:function" in str(e.value)


# ---------------------------------------------------------------- check_signature


def test_signatures_that_fit_the_convention():
    def kw_only(prompts, completions, **kw): ...
    def with_answer(prompts, completions, answer): ...
    def with_ids(prompts, completions, completion_ids): ...
    def with_default(prompts, completions, bonus=1.0): ...
    def catch_all(**kw): ...

    class Callable_:
        def __call__(self, prompts, completions, answer): ...

    check_signature("a", kw_only, set())
    check_signature("b", with_answer, {"answer"})
    check_signature("c", with_ids, set())
    check_signature("d", with_default, set())
    check_signature("e", catch_all, set())
    check_signature("f", Callable_(), {"answer", "other"})
    check_signature("g", functools.partial(verifiers.regex_match, pattern=r"\d+"), set())
    for name, fn in verifiers.BUILTIN_REWARDS.items():
        if name != "regex_match":
            check_signature(name, fn, {"answer", "numbers", "target"})


def test_signature_needing_a_missing_column_names_it():
    def needs(prompts, completions, missing_col): ...

    with pytest.raises(TaskError, match=r"task\.reward='m:needs'.*\['missing_col'\]") as e:
        check_signature("m:needs", needs, {"answer"})
    assert "f(prompts, completions, **columns)" in str(e.value)
    with pytest.raises(TaskError, match="answer"):
        check_signature("exact_match", verifiers.exact_match, {"solution"})


def test_signature_without_prompts_and_completions_is_rejected():
    def nothing(): ...
    def star(*args): ...

    for fn in (nothing, star):
        with pytest.raises(TaskError, match=r"\['prompts', 'completions'\]"):
            check_signature("x", fn, {"answer"})


# ---------------------------------------------------------------- char_match


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("abc", "abc", 1.0),
        ("abd", "abc", 2 / 3),  # one wrong character
        ("xbc", "abc", 2 / 3),
        ("ab", "abc", 2 / 3),  # shorter: the missing character is a miss
        ("", "abc", 0.0),
        ("abcabc", "abc", 1.0),  # longer: what follows the answer is not scored
        ("bca", "abc", 0.0),  # shifted
        ("cba", "abc", 1 / 3),
        ("anything", "", 0.0),  # no answer scores 0, never divides by zero
    ],
)
def test_char_match_values(completion, answer, expected):
    assert char_match(["p"], [completion], [answer]) == [pytest.approx(expected)]


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("abc", "abc", 1.0),
        ("ab", "abc", 2 / 3),  # shorter: as char_match
        ("abcabc", "abc", 0.5),  # longer: the extra characters count against it
        ("abcd", "abc", 0.75),
        ("", "abc", 0.0),
        ("anything", "", 0.0),
    ],
)
def test_char_match_strict_charges_characters_after_the_answer(completion, answer, expected):
    assert char_match_strict(["p"], [completion], [answer]) == [pytest.approx(expected)]
    assert load_reward("char_match_strict") is char_match_strict


def test_char_match_is_batched():
    assert char_match(["p"] * 3, ["ab", "ba", "a"], ["ab", "ab", "ab"], completion_ids=[[1]] * 3) == [1.0, 0.0, 0.5]


# ---------------------------------------------------------------- the worker process


def test_weighted_sum_per_function_means_and_rows_nobody_scores(plugin, workers):
    w = new_worker(workers, [f"{plugin}:length", f"{plugin}:modes"], [2.0, 0.5])
    assert w.names == ["length", "modes"]
    s = score(w, ["a", "bb", "cccc"], ["ok", "ok", "ok"])
    assert s.rewards.dtype == np.float32
    np.testing.assert_allclose(s.rewards, [2 * 1 + 0.5 * 0.1, 2 * 2 + 0.5 * 0.2, 2 * 4 + 0.5 * 0.4], rtol=1e-6)
    assert s.per_function == pytest.approx({"length": 7 / 3, "modes": 0.7 / 3})
    assert not s.errors
    # None: "this function does not score this row"; a row nobody scores is 0 and counted
    s = score(w, ["a", "bb", "", ""], ["none", "ok", "ok", "none"])
    np.testing.assert_allclose(s.rewards, [2.0, 4.1, 0.0, 0.0], rtol=1e-6)
    assert s.per_function == pytest.approx({"length": 1.5, "modes": 0.1})  # means over the rows each scored
    assert s.errors == {"none": 1}
    s = score(w, ["", ""], ["none", "none"])
    assert s.rewards.tolist() == [0.0, 0.0] and s.per_function == {} and s.errors == {"none": 2}


def test_a_raising_function_scores_its_rows_zero_and_the_worker_goes_on(plugin, workers):
    w = new_worker(workers, [f"{plugin}:modes"])
    two = new_worker(workers, [f"{plugin}:length", f"{plugin}:modes"], [1.0, 1.0])
    s = score(w, ["a", "bb"], ["raise", "ok"])
    assert s.rewards.tolist() == [0.0, 0.0] and s.errors == {"raised": 2} and s.per_function == {}
    s = score(w, ["a", "bb"], ["ok", "ok"])
    np.testing.assert_allclose(s.rewards, [0.1, 0.2], rtol=1e-6)
    assert not s.errors and w.restarts == 0
    # with another function, the failing one adds nothing and the other still scores (a failed row is no "none")
    s = score(two, ["a", ""], ["raise", "ok"])
    assert s.rewards.tolist() == [1.0, 0.0] and s.errors == {"raised": 2}
    assert s.per_function == {"length": 1.0}


def test_bad_return_values_are_counted_per_row(plugin, workers):
    w = new_worker(workers, [f"{plugin}:modes"])
    s = score(w, ["abcde"] * 8, ["ok", "nan", "inf", "-inf", "str", "bool", "np32", "np64"])
    np.testing.assert_allclose(s.rewards, [0.5, 0, 0, 0, 0, 0, 0.25, 0.75], rtol=1e-6)
    assert s.errors == {"non_finite": 3, "not_a_number": 2}
    assert s.per_function == pytest.approx({"modes": 0.5})
    s = score(w, ["a", "b"], ["npint", "int"])
    assert s.rewards.tolist() == [2.0, 4.0] and not s.errors
    s = score(w, ["a", "b", "c"], ["wrong_length", "ok", "ok"])
    assert s.rewards.tolist() == [0.0] * 3 and s.errors == {"wrong_length": 3}
    s = score(w, ["a", "b"], ["not_a_list", "ok"])
    assert s.rewards.tolist() == [0.0] * 2 and s.errors == {"not_a_number": 2}
    assert all(math.isfinite(x) for x in s.rewards) and w.restarts == 0


def test_a_hung_function_times_out_and_a_dying_worker_restarts(plugin, workers):
    w = new_worker(workers, [f"{plugin}:modes"])
    assert score(w, ["ab"], ["ok"]).rewards.tolist() == [pytest.approx(0.2)]
    waits = []
    t0 = time.monotonic()
    s = score(w, ["a", "b", "c"], ["sleep", "ok", "ok"], on_wait=lambda: waits.append(1))
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.0
    assert s.rewards.tolist() == [0.0] * 3 and s.errors == {"timeout": 3} and w.restarts == 1
    assert len(waits) >= 2  # the caller keeps its heartbeat while it waits
    s = score(w, ["abc", "a"], ["ok", "ok"])
    np.testing.assert_allclose(s.rewards, [0.3, 0.1], rtol=1e-6)
    assert not s.errors and w.restarts == 1
    t0 = time.monotonic()
    s = score(w, ["a", "b"], ["exit", "ok"])
    assert time.monotonic() - t0 < TIMEOUT_S
    assert s.rewards.tolist() == [0.0, 0.0] and s.errors == {"worker_died": 2} and w.restarts == 2
    assert w.proc.is_alive()
    s = score(w, ["abcd"], ["ok"])
    assert s.rewards.tolist() == [pytest.approx(0.4)] and not s.errors and w.restarts == 2
    w.proc.kill()  # killed between calls (the OOM killer): the next call notices, restarts, and the one after works
    w.proc.join(5)
    assert score(w, ["a"], ["ok"]).errors == {"worker_died": 1} and w.restarts == 3
    assert score(w, ["a"], ["ok"]).rewards.tolist() == [pytest.approx(0.1)]


def test_a_loud_function_leaves_a_bounded_log_and_counts_what_it_dropped(plugin, workers, caplog):
    """Issue 19: a reward printing 10 MB per call wrote 5.5 GB of logs in 36 s. The worker's fd 1 and 2 are a
    pipe the server drains: at most the budget reaches the log, the rest is counted, and the calls never block."""
    caplog.set_level(logging.INFO, logger="podsrl.rollout")
    budget, calls, per_call = 100_000, 4, len("loud call\n") + 2 * 500_000
    w = new_worker(workers, [f"{plugin}:loud"], output_bytes=budget, output_window_s=3600.0)
    for _ in range(calls):
        s = score(w, ["ab"])
        assert s.rewards.tolist() == [2.0] and not s.errors
    w.close()  # joins the drain: every byte the worker wrote has been logged or counted
    out = w.output
    assert out.seen == calls * per_call and out.forwarded == budget and out.dropped == calls * per_call - budget
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reward output (loud)")]
    assert "reward output (loud): loud call" in lines
    assert sum(len(line) for line in lines) < budget + 200 * len(lines)  # the bytes, a prefix per line, a note
    assert len(lines) < 10 and sum("the rest of this window is dropped" in line for line in lines) == 1
    assert w.restarts == 0


def test_output_budget_renews_each_window_and_warns_once_per_window(caplog):
    caplog.set_level(logging.INFO, logger="podsrl.rollout")
    now = [0.0]
    out = OutputBudget(["f"], limit=10, window_s=10.0, clock=lambda: now[0])
    out.feed(b"abc\ndefghijkl\n")  # 14 bytes: 10 forwarded, 4 dropped
    out.feed(b"more\n")  # dropped
    now[0] = 10.0
    out.feed(b"new\n")  # a new window
    assert (out.seen, out.forwarded, out.dropped) == (23, 14, 9)
    notes = [r.getMessage().removeprefix("reward output (f): ") for r in caplog.records]
    assert notes[:2] == ["abc", "defghi[...]"] and notes[3] == "new" and len(notes) == 4
    assert notes[2].startswith("over 10 bytes in 10s: the rest of this window is dropped")


def test_worker_start_up_is_not_counted_against_the_call(tmp_path, workers):
    # importing a reward module (sympy, torch, ...) can take longer than task.reward_timeout_s: the call's clock
    # starts once the worker has loaded its functions, or every call would time out and restart it forever
    slow = write_module(
        tmp_path,
        "slow_import",
        """
        import time
        time.sleep(1.0)  # not a wait: a slow import (sympy, torch, ...), the situation under test
        def f(prompts, completions, **kw):
            return [1.0] * len(completions)
        """,
    )
    w = new_worker(workers, [f"{slow}:f"], timeout_s=0.3)
    s = w.score(["p"], ["a"], [[1]], {})
    assert s.rewards.tolist() == [1.0] and not s.errors and w.restarts == 0
    assert w.score(["p"], ["a"], [[1]], {}).rewards.tolist() == [1.0]


def test_completion_ids_and_prompts_reach_the_function(plugin, workers):
    w = new_worker(workers, [f"{plugin}:by_ids", f"{plugin}:echo_prompt"], [1.0, 100.0])
    s = w.score(["x", "long prompt"], ["decoded text is ignored", ""], [[1, 2, 3], [40]], {"unused": [1, 2]})
    assert s.rewards.tolist() == [6.0 + 100.0, 40.0 + 1100.0] and not s.errors


def test_close_ends_the_worker(plugin):
    w = RewardWorker([f"{plugin}:length"], [1.0], TIMEOUT_S)
    proc = w.proc
    w.close()
    assert not proc.is_alive()


def test_builtins_score_in_process_exactly_as_the_worker_does(workers):
    """Built-ins skip the worker process (no round trip); the same functions named by module path go
    through the worker, and every row scores the same."""
    completions = ["#### 42", "the answer is \\boxed{42}", "#### 41", "", "#### 4,2"]
    answer = ["42"] * len(completions)
    fast = new_worker(workers, ["math_answer", "exact_match"])
    slow = new_worker(
        workers, ["rollout_server.tasks.verifiers:math_answer", "rollout_server.tasks.verifiers:exact_match"]
    )
    assert fast.in_process is not None and fast.proc is None
    assert slow.in_process is None and slow.proc is not None
    ids = [[ord(c) for c in x] for x in completions]
    a = fast.score(["p"] * 5, completions, ids, {"answer": answer})
    b = slow.score(["p"] * 5, completions, ids, {"answer": answer})
    assert a.rewards.tolist() == b.rewards.tolist() and a.rewards[0] > 0 and a.rewards[2] == 0
    assert list(a.per_function.values()) == list(b.per_function.values()) and a.errors == b.errors


# ---------------------------------------------------------------- the selector's bound, and runs that cannot train

HOSTILE = ["big", "-big", "inf", "-inf", "nan"]  # 1e38, -1e38, +inf, -inf, NaN


def test_values_outside_the_selectors_bound_are_that_functions_failure(plugin, workers):
    # issue 19: 1e38 rewards got every group rejected by the selector (selector.max_abs_reward), silently
    w = new_worker(workers, [f"{plugin}:length", f"{plugin}:modes"], max_abs=100.0)
    s = score(w, ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"], [*HOSTILE, "ok"])
    np.testing.assert_allclose(s.rewards, [1, 2, 3, 4, 5, 6.6], rtol=1e-6)  # the valid function still scores
    assert s.errors == {"out_of_range": 2, "non_finite": 3}
    assert s.failures == {"modes": "out_of_range: returned 1e+38, outside +-selector.max_abs_reward=100"}
    assert s.per_function == pytest.approx({"length": 3.5, "modes": 0.6})
    assert float(np.abs(s.rewards).max()) <= 100.0
    s = score(w, ["a"], ["nan"])
    assert s.failures == {"modes": "non_finite: returned nan"} and s.rewards.tolist() == [1.0]
    # each value within the bound, their weighted sum not: the row scores 0, counted, and no function is blamed
    heavy = new_worker(workers, [f"{plugin}:length", f"{plugin}:modes"], [60.0, 1.0], max_abs=100.0)
    s = score(heavy, ["a", "bb"], ["ok", "ok"])
    np.testing.assert_allclose(s.rewards, [60.1, 0.0], rtol=1e-6)
    assert s.errors == {"out_of_range": 1} and not s.failures


def test_builtins_in_process_are_bounded_too(workers):
    w = new_worker(workers, ["exact_match"], max_abs=0.5)
    assert w.in_process is not None
    s = w.score(["p", "p"], ["42", "41"], [[1], [1]], {"answer": ["42", "42"]})
    assert s.rewards.tolist() == [0.0, 0.0] and s.errors == {"out_of_range": 1}
    assert s.failures == {"exact_match": "out_of_range: returned 1.0, outside +-selector.max_abs_reward=0.5"}


@pytest.mark.parametrize("mode", HOSTILE)
def test_consecutive_failed_calls_stop_naming_the_function_and_the_fix(plugin, workers, mode):
    w = new_worker(workers, [f"{plugin}:length", f"{plugin}:modes"], max_abs=100.0, max_failures=3)
    for _ in range(2):
        score(w, ["a", "b"], [mode, mode])
    score(w, ["a", "b", "c"], [mode, "ok", "ok"])  # one bad row of three: the call did not fail, the streak restarts
    score(w, ["a"], [mode])
    score(w, ["a"], [mode])
    with pytest.raises(RewardFailure, match=r"reward function 'modes' failed 3 calls in a row") as e:
        score(w, ["a", "b", "c"], [mode, mode, "ok"])  # most rows failed
    message = str(e.value)
    assert ("out_of_range: returned" if "big" in mode else "non_finite: returned") in message
    assert "selector.max_abs_reward" in message and "task.max_reward_failures=0" in message
    assert w.streaks.streaks == [0, 3]  # the other function is fine


def test_raising_and_hung_functions_stop_the_run_too_and_zero_never_stops(plugin, workers):
    w = new_worker(workers, [f"{plugin}:modes"], timeout_s=0.5, max_failures=2)
    score(w, ["a"], ["raise"])
    with pytest.raises(RewardFailure, match=r"'modes' failed 2 calls.*raised RuntimeError: the reward function failed"):
        score(w, ["a"], ["raise"])
    score(w, ["a"], ["ok"])
    score(w, ["a"], ["sleep"])
    with pytest.raises(RewardFailure, match=r"timeout: ran past task.reward_timeout_s=0.5"):
        score(w, ["a"], ["sleep"])
    forever = new_worker(workers, ["exact_match"], max_abs=0.5)  # task.max_reward_failures=0: count, never stop
    for _ in range(5):
        assert forever.score(["p"], ["1"], [[1]], {"answer": ["1"]}).errors == {"out_of_range": 1}
