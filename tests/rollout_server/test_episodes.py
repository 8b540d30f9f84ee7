"""Multi-turn episodes on the rollout server (issue 21): tool calls parsed from the model's text, environment
steps in the reward worker (killable), and token-level stitching of the model's own ids with the
environment's tokens."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from launcher.tiny import build_tiny_model
from protocol.codec import decode, encode
from protocol.config import load_config
from protocol.messages import ScoredEpisodes
from protocol.weights import pack_weights
from rollout_server.engine import TorchEngine
from rollout_server.episodes import env_tokens, group_arrays, run_episodes, score_episodes
from rollout_server.sampling import Samples, SamplingSpec
from rollout_server.tasks import Task, words_of
from rollout_server.tasks.environments import CalcEnv, CalcShapedEnv, calc, env_call, parse_tool_call
from rollout_server.tasks.rewards import RewardWorker
from selector.bounds import Bounds

TOOLS = {"calc": calc}


def test_tool_calls_are_parsed_in_the_documented_format():
    assert parse_tool_call("let me see <tool>calc(123*456)</tool>", TOOLS) == ("calc", "123*456")
    assert parse_tool_call("<tool>123*456</tool>", TOOLS) == ("calc", "123*456")  # the only tool, unnamed
    assert parse_tool_call("56088", TOOLS) is None
    assert parse_tool_call("<tool>123*456", TOOLS) is None  # never closed: no call
    two: dict[str, Callable[[str], Any]] = {"calc": calc, "echo": str}
    assert parse_tool_call("<tool>echo(hi)</tool>", two) == ("echo", "hi")
    assert parse_tool_call("<tool>nope(1)</tool>", two) == ("nope", "1")  # answered as an unknown tool
    assert parse_tool_call("<tool>" + "9" * 5000 + "</tool>", TOOLS) == ("", "")  # too long to parse


def test_calc_multiplies_and_never_evaluates_code():
    assert calc("123*456") == "56088" and calc(" 7 + 5 ") == "12" and calc("3-10") == "-7"
    assert calc("123*456=") == "56088"  # the question as the prompt writes it
    for bad in ("9**9**9", "__import__('os')", "1*2*3", "9" * 19 + "*2", ""):
        assert calc(bad) is None


def test_the_calc_environment_answers_a_call_and_ends_on_an_answer():
    row = {"prompt": "123*456=", "answer": "56088"}
    ok, (new, reward, calls, errors) = env_call(
        CalcEnv, row, [{"role": "assistant", "content": "<tool>123*456</tool>"}], 100
    )
    assert ok == "ok" and new == [{"role": "tool", "content": "<result>56088</result>"}] and calls == 1
    assert reward is None and errors == {}
    _, (new, _, _, errors) = env_call(CalcEnv, row, [{"role": "assistant", "content": "<tool>12*</tool>"}], 100)
    assert new == [{"role": "tool", "content": "<result></result>"}] and errors == {"no_result": 1}
    assert env_call(CalcEnv, row, [{"role": "assistant", "content": "56088"}], 100) == ("ok", (None, None, 0, {}))


def test_the_shaped_calc_environment_pays_for_the_call_and_then_the_answer():
    """c x (0.5 + 0.5 a): c the call's characters in place against '123*456', a the answer's digits in place."""
    row = {"prompt": "123*456=", "answer": "56088"}

    def reward(*turns: str) -> float | None:
        messages: list[dict[str, str]] = []
        r = None
        for i, text in enumerate(turns):
            messages.append({"role": "assistant", "content": text})
            kind, (new, r, _, _) = env_call(CalcShapedEnv, row, messages, 100)
            assert kind == "ok" and (new is None) == (i == len(turns) - 1)
            messages += new or []
        return r

    assert reward("<tool>123*456</tool>", "56088") == 1.0
    assert reward("<tool>123*456</tool>", "56000") == pytest.approx(0.5 + 0.5 * 3 / 5)
    assert reward("<tool>123*9</tool>", "1107") == pytest.approx(4 / 7 * (0.5 + 0.5 / 5))  # another product: 0 in place
    assert reward("56088") == 0.0  # no call: guessing pays nothing, even a right guess


HOSTILE = """
import os, time

class Env:
    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        what = messages[-1]["content"]
        if what == "sleep":
            time.sleep(3600)
        if what == "raise":
            raise RuntimeError("the tool broke")
        if what == "huge":
            return [{"role": "tool", "content": "x" * (10 << 20)}], None
        if what == "one_mb":
            return [{"role": "tool", "content": "<result>" + "7" * (1 << 20) + "</result>"}], None
        if what == "exit":
            os._exit(7)
        if what == "nan":
            return None, float("nan")
        if what == "junk":
            return "not messages", None
        return [{"role": "tool", "content": "<result>" + str(len(messages)) + "</result>"}], None
"""


@pytest.fixture(scope="module")
def hostile_env(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("env") / "hostile_env.py"
    path.write_text(HOSTILE)
    return f"{path}:Env"


def test_a_hostile_environment_is_cut_counted_and_the_worker_goes_on(hostile_env):
    """A step that sleeps forever, raises, returns 10 MB or a 1 MB tool result, calls os._exit, returns NaN or
    junk: each ends with a reason (the hang at its timeout, the worker restarted), and the next step of the
    same worker works."""
    worker = RewardWorker(["copy"], [1.0], 10.0, env=hostile_env, env_timeout_s=1.5, max_env_chars=1 << 20)
    row = {"prompt": "ab=", "answer": "ab"}
    try:
        assert worker.step_env(row, [{"role": "assistant", "content": "hello"}]) == (
            "ok",
            ([{"role": "tool", "content": "<result>2</result>"}], None, 0, {}),
        )
        for what, reason in (
            ("sleep", "timeout"),
            ("raise", "raised"),
            ("huge", "too_long"),
            ("one_mb", "too_long"),
            ("exit", "worker_died"),
            ("nan", "bad_reward"),
            ("junk", "bad_output"),
        ):
            kind, detail = worker.step_env(row, [{"role": "assistant", "content": what}])
            assert kind == reason, (what, kind, detail)
            ok, _ = worker.step_env(row, [{"role": "assistant", "content": "again"}])
            assert ok == "ok", what
        assert worker.restarts == 2  # the hang and the exit
        assert worker.step_env(row, [{"role": "assistant", "content": "raise"}])[1] == "RuntimeError: the tool broke"
    finally:
        worker.close()


# -- stitching: a real engine, a real tokenizer, an environment in the worker ---------------------------


class Recording:
    """The real engine, keeping what it sampled each call (the model's own tokens, to compare with)."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[list[np.ndarray], int, Samples]] = []
        self.version = engine.version

    def load(self, *a: Any, **kw: Any) -> None:
        self.engine.load(*a, **kw)

    def generate(self, prompts: list[np.ndarray], n: int, spec: SamplingSpec, seed: int) -> Samples:
        out = self.engine.generate(prompts, n, spec, seed)
        self.calls.append(([p.copy() for p in prompts], n, out))
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, hostile_env):
    tmp = tmp_path_factory.mktemp("stitch")
    cfg = load_config(
        None,
        [
            f"run.dir={tmp / 'run'}",
            "task.length=2",
            f"task.environment={hostile_env}",
            "task.max_turns=3",
            "rollout.max_new_tokens=6",
            "rollout.group_size=4",
        ],
    )
    build_tiny_model(cfg, cfg.model_dir, "abcdefghijkl=<>/0123456789", words_of(cfg.task))
    from learner.model import load_model

    model = load_model(cfg.model_dir, torch.device("cpu"))
    engine = TorchEngine(load_config(None, ["rollout.engine.device=cpu"]))
    engine.load(pack_weights(model.state_dict(), 0, model.config.to_json_string()))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    task = Task(cfg, tokenizer, model.config.to_dict(), seed=3)
    yield cfg, engine, task
    task.close()


def test_an_episode_is_the_models_own_tokens_and_the_environments_stitched(setup):
    """Every model token of an episode is what the engine sampled (never re-tokenized), in turn order, each
    turn sampled with the episode so far as its context; every environment token is the tokenized answer
    (loss mask 0, log-prob 0); the group is a valid ScoredEpisodes within the run's bounds."""
    cfg, engine, task = setup
    recording = Recording(engine)
    prompts = task.next_prompts(2)
    spec = SamplingSpec(cfg.max_new_tokens, 1.0, task.stop_ids, task.pad_id)
    episodes, stats = run_episodes(recording, task, cfg, prompts, 4, spec, seed=11)
    assert [e.turns for e in episodes] and max(e.turns for e in episodes) == 3  # the environment always answers
    # replay: turn t's call holds the live episodes in order; match each episode's turns to the calls
    turns_of: dict[int, list[np.ndarray]] = {id(e): [] for e in episodes}
    first_prompts, n, first = recording.calls[0]
    assert n == 4 and [p.tolist() for p in first_prompts] == [p.ids.tolist() for p in prompts]
    for e, ids in zip(episodes, first.ids, strict=True):
        turns_of[id(e)].append(ids)
    for contexts, n, out in recording.calls[1:]:
        assert n == 1
        live = [e for e in episodes if len(turns_of[id(e)]) < e.turns]
        for e, ctx, ids in zip(live, contexts, out.ids, strict=True):
            k = len(turns_of[id(e)])
            so_far = np.concatenate([e.prompt.ids, *e.ids[: 2 * k]])  # k turns and their k answers
            assert ctx.tolist() == so_far.tolist()  # the context is the episode's own ids so far
            turns_of[id(e)].append(ids)
    for e in episodes:
        model_pieces = [p for p, m in zip(e.ids, e.mask, strict=True) if m.all()]
        env_pieces = [p for p, m in zip(e.ids, e.mask, strict=True) if not m.any()]
        assert [p.tolist() for p in model_pieces] == [
            t[: len(p)].tolist() for p, t in zip(model_pieces, turns_of[id(e)], strict=True)
        ]
        answers = [m for m in e.messages if m["role"] != "assistant"]
        assert [p.tolist() for p in env_pieces] == [env_tokens([a], task.tokenizer).tolist() for a in answers]
        assert all(not lp.any() for lp, m in zip(e.logprobs, e.mask, strict=True) if not m.any())
    rewards, _ = score_episodes(task, episodes, cfg.selector.max_abs_reward, stats)
    group = ScoredEpisodes(
        server_id="r0",
        session=1,
        group_id=0,
        version=0,
        task=task.name,
        gen_seconds=0.1,
        prompt_ids=prompts[0].ids,
        rewards=rewards[:4],
        **group_arrays(episodes[:4]),
    )
    got: ScoredEpisodes = decode(encode(group))
    assert isinstance(got, ScoredEpisodes) and got.turns.tolist() == [e.turns for e in episodes[:4]]
    Bounds(cfg, version=0, vocab_size=len(task.tokenizer)).check(got)


def test_an_environment_that_cannot_load_is_named_with_the_fix(tmp_path):
    from rollout_server.tasks import TaskError
    from rollout_server.tasks.environments import load_environment

    (tmp_path / "envs.py").write_text("class NoStep:\n    def reset(self, row):\n        return []\n")
    for spec, words in (
        ("nope", "neither a built-in (calc, calc_shaped)"),
        (f"{tmp_path}/missing.py:Env", "does not exist"),
        (f"{tmp_path}/envs.py:Other", "has no class 'Other'"),
        (f"{tmp_path}/envs.py:NoStep", "is not a class with reset(row) and step(messages)"),
    ):
        with pytest.raises(TaskError, match=re.escape(words)):
            load_environment(spec)
    assert load_environment("calc") is CalcEnv
