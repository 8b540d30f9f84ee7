"""Well-formed but hostile groups: every run bound rejects with its reason; identities stop replays."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.config import load_config
from protocol.messages import ProtocolError, ScoredEpisodes, ScoredGroup
from selector.bounds import Bounds, Early, Identities

CFG = load_config(None, ["rollout.group_size=4", "task.max_prompt_tokens=8", "rollout.max_new_tokens=5"])
VOCAB = 17
TRIED: dict[str, int] = {"valid": 0, "rejected": 0}  # reported by the last test: how many inputs hypothesis tried


def group(**kw: Any) -> ScoredGroup:
    base = ScoredGroup(
        server_id="s-0",
        session=1,
        group_id=0,
        version=3,
        task="copy",
        gen_seconds=0.1,
        prompt_ids=np.array([1, 5, 6, 2], np.int32),
        completion_ids=np.arange(4, 16, dtype=np.int32),
        completion_lens=np.array([3, 3, 3, 3], np.int32),
        logprobs=np.full(12, -0.5, np.float32),
        rewards=np.array([0, 1, 0, 1], np.float32),
    )
    return dataclasses.replace(base, **kw)


def bounds() -> Bounds:
    return Bounds(CFG, version=5, floor=2, vocab_size=VOCAB)


def test_a_group_within_every_bound_passes():
    bounds().check(group())
    bounds().check(group(version=2))  # the floor itself is trainable
    bounds().check(group(version=5, logprobs=np.full(12, -99.0, np.float32), rewards=np.full(4, -1e4, np.float32)))


@pytest.mark.parametrize(
    ("reason", "bad"),
    [
        ("version_future", group(version=6)),
        ("version_future", group(version=2**40)),
        ("version_discarded", group(version=1)),
        ("task", group(task="reverse")),
        ("group_size", group(completion_lens=np.array([6, 6], np.int32), rewards=np.zeros(2, np.float32))),
        (
            "group_size",
            group(
                completion_lens=np.full(8, 1, np.int32),
                completion_ids=np.arange(8, dtype=np.int32),
                logprobs=np.zeros(8, np.float32),
                rewards=np.zeros(8, np.float32),
            ),
        ),
        ("length", group(prompt_ids=np.ones(9, np.int32))),
        ("length", group(completion_lens=np.array([6, 2, 2, 2], np.int32))),
        ("token_id", group(completion_ids=np.array([4] * 11 + [VOCAB], np.int32))),
        ("token_id", group(prompt_ids=np.array([1, 10**6], np.int32))),
        ("token_id", group(prompt_ids=np.array([1, -3], np.int32))),
        ("logprob", group(logprobs=np.array([-0.5] * 11 + [-1000.0], np.float32))),
        ("reward", group(rewards=np.array([0, 1e30, 0, 1], np.float32))),
        ("reward", group(rewards=np.array([0, -1e5, 0, 1], np.float32))),
    ],
)
def test_each_absurd_value_is_rejected_with_its_reason(reason, bad):
    with pytest.raises(ProtocolError) as e:
        bounds().check(bad)
    assert e.value.reason == reason, e.value
    assert "s-0" in str(e.value)  # the message names the sender


def test_unknown_vocabulary_skips_only_the_token_check():
    b = Bounds(CFG, version=5)
    b.check(group(completion_ids=np.array([4] * 11 + [10**6], np.int32)))
    with pytest.raises(ProtocolError, match="group_size"):
        b.check(group(completion_lens=np.array([6, 6], np.int32), rewards=np.zeros(2, np.float32)))


@settings(max_examples=300, deadline=None, database=None)
@given(
    version=st.integers(0, 8) | st.integers(0, 2**53),
    token=st.integers(-2, 20) | st.integers(-(2**31), 2**31 - 1),
    logprob=st.floats(-120, 0, width=32) | st.floats(-1e6, 0, width=32),
    reward=st.floats(-2e4, 2e4, width=32) | st.sampled_from([1e30, -3.4e38]),
    prompt_len=st.integers(1, 10),
    longest=st.integers(0, 7),
)
def bounds_accept_exactly_the_values_within_them(version, token, logprob, reward, prompt_len, longest):
    """A valid message with arbitrary values: accepted iff every value is within the run's bounds."""
    lens = np.array([longest, 1, 1, 1], np.int32)
    g = group(
        version=version,
        prompt_ids=np.full(prompt_len, 3, np.int32),
        completion_ids=np.array([token] + [4] * (int(lens.sum()) - 1), np.int32)[: int(lens.sum())],
        completion_lens=lens,
        logprobs=np.array([logprob] + [-0.1] * (int(lens.sum()) - 1), np.float32),
        rewards=np.array([reward, 0, 0, 1], np.float32),
    )
    g.check()  # well formed
    ok = (
        2 <= version <= 5
        and prompt_len <= 8
        and longest <= 5
        and 0 <= token < VOCAB
        and np.float32(logprob) >= -100
        and abs(np.float32(reward)) <= 1e4
    )
    try:
        bounds().check(g)
    except ProtocolError:
        TRIED["rejected"] += 1
        assert not ok
    else:
        TRIED["valid"] += 1
        assert ok


def test_bounds_accept_exactly_the_values_within_them():
    """The property over 300 hypothesis inputs; it must have tried accepted and rejected ones."""
    TRIED.update(valid=0, rejected=0)
    bounds_accept_exactly_the_values_within_them()
    print(f"bounds property test: {TRIED['valid']} accepted, {TRIED['rejected']} rejected inputs")
    assert TRIED["valid"] > 0 and TRIED["rejected"] > 100, TRIED


def test_replays_are_dropped_and_gaps_counted():
    ids = Identities(takeover_s=6.0)
    ids.check_group(group(group_id=0), now=0.0)
    ids.check_group(group(group_id=1), now=0.1)
    for _ in range(3):
        with pytest.raises(ProtocolError, match="duplicate"):
            ids.check_group(group(group_id=1), now=0.2)
    with pytest.raises(ProtocolError, match="duplicate"):
        ids.check_group(group(group_id=0), now=0.2)
    ids.check_group(group(group_id=5), now=0.3)
    assert ids.gaps == 3


def test_a_second_live_process_with_the_same_id_is_refused_a_restarted_one_takes_over():
    ids = Identities(takeover_s=6.0)
    ids.check_group(group(session=1, group_id=7), now=0.0)
    with pytest.raises(ProtocolError, match="server_id_in_use") as e:
        ids.check_group(group(session=2, group_id=0), now=1.0)
    assert "--server-id" in str(e.value)
    ids.check_group(group(session=1, group_id=8), now=2.0)  # the first keeps working
    ids.check_group(group(session=2, group_id=0), now=8.5)  # silent for 6.5 s: a restart takes the id over
    with pytest.raises(ProtocolError, match="server_id_in_use"):
        ids.check_group(group(session=1, group_id=9), now=9.0)  # the old session is now the intruder


def test_a_rival_is_told_only_once_the_holder_has_spoken_since():
    """Issue 19: a second live process is told (and stops); a restart, whose predecessor is silent, is not."""
    ids = Identities(takeover_s=6.0)
    ids.admit("a", 1, now=0.0)
    with pytest.raises(ProtocolError, match="server_id_in_use"):
        ids.admit("a", 2, now=1.0)
    assert not ids.holder_alive("a")  # the holder may be dead: session 2 may be its restart
    ids.admit("a", 1, now=2.0)
    assert ids.holder_alive("a")  # both live: session 2 is told
    with pytest.raises(ProtocolError, match="server_id_in_use"):
        ids.admit("a", 3, now=2.5)  # a newer rival: the holder must speak again before it is told
    assert not ids.holder_alive("a")
    ids.admit("b", 1, now=0.0)
    with pytest.raises(ProtocolError, match="server_id_in_use"):
        ids.admit("b", 2, now=1.0)
    ids.admit("b", 2, now=6.5)  # a restart: b's session 1 never spoke again and is taken over, never told
    assert ids.sessions["b"].session == 2 and not ids.holder_alive("b") and not ids.holder_alive("c")


def test_a_selector_that_meets_a_session_midway_counts_no_gap():
    ids = Identities(takeover_s=6.0)
    ids.check_group(group(group_id=212), now=0.0)  # a restarted selector: the server has sent 212 groups before
    ids.check_group(group(group_id=213), now=0.1)
    assert ids.gaps == 0


def test_grow_n_admits_group_sizes_up_to_its_cap_only():
    cfg = load_config(
        None,
        [
            "rollout.group_size=4",
            "task.max_prompt_tokens=8",
            "rollout.max_new_tokens=5",
            "rollout.surplus=grow_n",
            "rollout.max_group_size=6",
        ],
    )
    b = Bounds(cfg, version=5, floor=2, vocab_size=VOCAB)
    for n in (4, 5, 6):
        b.check(
            group(
                completion_lens=np.full(n, 1, np.int32),
                completion_ids=np.arange(n, dtype=np.int32),
                logprobs=np.full(n, -0.5, np.float32),
                rewards=np.zeros(n, np.float32),
            )
        )
    for n in (3, 7):
        with pytest.raises(ProtocolError, match="group_size"):
            b.check(
                group(
                    completion_lens=np.full(n, 1, np.int32),
                    completion_ids=np.arange(n, dtype=np.int32),
                    logprobs=np.full(n, -0.5, np.float32),
                    rewards=np.zeros(n, np.float32),
                )
            )
    with pytest.raises(ValueError, match="max_group_size"):
        load_config(None, ["rollout.group_size=4", "rollout.max_group_size=3"])


def test_early_groups_are_released_once_announced_rejected_after_the_wait_and_bounded_per_server():
    early = Early(wait_s=1.0, per_server=2)
    first, second, other = group(version=6, group_id=0), group(version=6, group_id=1), group(version=7, server_id="s-1")
    early.hold(first, now=0.0)
    early.hold(second, now=0.5)
    with pytest.raises(ProtocolError) as info:  # a third of s-0's: the hold is bounded per server
        early.hold(group(version=6, group_id=2), now=0.5)
    assert info.value.reason == "version_future"
    early.hold(other, now=0.5)
    assert early.release(5, now=0.9) == ([], []) and len(early) == 3  # nothing announced, nothing expired
    assert early.release(6, now=0.9) == ([first, second], [])  # version 6 announced: both of s-0's go in
    third = group(version=6, group_id=3)
    early.hold(third, now=0.9)  # s-0 has room again
    assert early.release(6, now=1.5) == ([third], [other])  # version 7 was never announced
    assert len(early) == 0 and not early.per_id


# episodes (issue 21): a run with an environment bounds turns and the whole episode's tokens
ENV_CFG = load_config(
    None,
    [
        "rollout.group_size=4",
        "task.type=product",
        "task.environment=calc",
        "task.max_turns=3",
        "task.max_episode_tokens=20",
        "rollout.max_new_tokens=5",
    ],
)


def episodes(lens: list[int], turns: list[int], env: int = 2, task: str = "product") -> ScoredEpisodes:
    """Episodes of ``lens`` tokens, each with up to ``env`` environment tokens (log-prob 0) after its first two;
    the last token is the model's."""
    parts = []
    for n in lens:
        m = np.ones(n, np.uint8)
        m[2 : min(2 + env, n - 1)] = 0
        parts.append(m)
    mask = np.concatenate(parts)
    return ScoredEpisodes(
        **{f.name: getattr(group(task=task), f.name) for f in dataclasses.fields(ScoredGroup)}
        | {
            "completion_ids": np.full(sum(lens), 4, np.int32),
            "completion_lens": np.array(lens, np.int32),
            "logprobs": np.where(mask == 1, -0.5, 0.0).astype(np.float32),
        },
        loss_mask=mask,
        turns=np.array(turns, np.int32),
    )


def test_episodes_within_the_run_bounds_pass_and_longer_or_more_turns_are_rejected():
    b = Bounds(ENV_CFG, version=5, floor=2, vocab_size=VOCAB)
    b.check(episodes([20, 5, 6, 7], [3, 1, 2, 2]))  # an episode may exceed max_new_tokens (one turn's cap)
    for bad, reason in ((episodes([21, 5, 6, 7], [3, 1, 2, 2]), "length"), (episodes([9] * 4, [4, 1, 1, 1]), "turns")):
        with pytest.raises(ProtocolError) as e:
            b.check(bad)
        assert e.value.reason == reason and "s-0" in str(e.value)


def test_a_run_without_an_environment_takes_one_turn_episodes_only():
    """A single-turn run bounds an episode as a completion: max_new_tokens tokens, one turn."""
    b = bounds()
    b.check(episodes([5, 3, 3, 3], [1, 1, 1, 1], env=0, task="copy"))
    for bad, reason in (
        (episodes([5, 3, 3, 3], [2, 1, 1, 1], task="copy"), "turns"),
        (episodes([6, 3, 3, 3], [1, 1, 1, 1], task="copy"), "length"),
    ):
        with pytest.raises(ProtocolError) as e:
            b.check(bad)
        assert e.value.reason == reason
