"""The HTTP endpoint's pure parts: the episode book (stitching, bounds, drops) and request checks, without sockets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from protocol.messages import ScoredEpisodes
from rollout_server.http_episodes import BookError, EpisodeBook, Limits, stitch
from rollout_server.openai_api import ApiError, parse
from rollout_server.openai_api import Limits as ApiLimits

LIMITS = Limits(
    max_open=4, max_turns=3, max_tokens=20, max_prompt_tokens=8, timeout_s=10, max_abs_reward=5, min_n=2, max_n=2
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def ids(*xs: int) -> np.ndarray:
    return np.asarray(xs, np.int32)


def opened(book: EpisodeBook, client: str = "c") -> list[str]:
    lps = [np.full(2, -0.5, np.float32), np.full(1, -0.25, np.float32)]
    return book.open(client, ids(1, 2, 3), [ids(7, 8), ids(9)], lps, version=4, s=0.1)


def test_stitch_takes_the_suffix_only_after_an_exact_prefix() -> None:
    for prompt, rest in ((ids(1, 2, 5, 6), [5, 6]), (ids(1, 2), [])):
        found = stitch(ids(1, 2), prompt)
        assert found is not None and found.tolist() == rest
    assert stitch(ids(1, 2), ids(1, 3, 5)) is None
    assert stitch(ids(1, 2, 3), ids(1, 2)) is None


def test_a_group_of_episodes_is_stitched_and_becomes_a_valid_scored_episodes() -> None:
    totals: Counter[str] = Counter()
    book = EpisodeBook(LIMITS, totals)
    a, b = opened(book)
    context, room = book.begin(a, "c")
    assert context.tolist() == [1, 2, 3, 7, 8] and room == 18
    with pytest.raises(BookError, match="in flight"):
        book.begin(a, "c")
    book.add_turn(a, "c", ids(5, 6), ids(4), np.full(1, -1.0, np.float32), version=3, s=0.2)
    assert book.reward(a, "c", 1) is None
    with pytest.raises(BookError, match="already has its reward"):
        book.reward(a, "c", 1)
    with pytest.raises(BookError, match="no open episode"):
        book.reward(b, "someone else", 1)
    part = book.reward(b, "c", -0.5)
    assert part is not None and part["version"] == 3  # the oldest version of any turn
    g = ScoredEpisodes(server_id="s", session=1, group_id=0, task="copy", **part)
    g.check()
    assert g.completion_ids.tolist() == [7, 8, 5, 6, 4, 9] and g.loss_mask.tolist() == [1, 1, 0, 0, 1, 1]
    assert g.turns.tolist() == [2, 1] and g.rewards.tolist() == [1.0, -0.5] and g.completion_lens.tolist() == [5, 1]
    assert book.metrics()["http/episodes_open"] == 0 and book.metrics()["http/episodes_closed"] == 2


def test_bounds_open_episodes_turns_rewards_and_n() -> None:
    book = EpisodeBook(LIMITS, Counter())
    with pytest.raises(BookError, match="n in 2..2"):
        book.check_open("c", 3, 1)
    with pytest.raises(BookError, match="task.max_prompt_tokens=8"):
        book.check_open("c", 2, 9)
    opened(book)
    a, _ = opened(book)
    with pytest.raises(BookError, match="http_max_open_episodes=4") as e:
        book.check_open("c", 2, 1)
    assert e.value.status == 429
    book.check_open("other", 2, 1)  # the bound is per client
    for _ in range(2):
        book.begin(a, "c")
        book.add_turn(a, "c", ids(), ids(4), np.zeros(1, np.float32) - 1, version=4, s=0)
    with pytest.raises(BookError, match="task.max_turns=3"):
        book.begin(a, "c")
    for bad in (float("nan"), True, "1", 6.0):
        with pytest.raises(BookError, match="reward"):
            book.reward(a, "c", bad)


def test_idle_and_mismatched_groups_are_dropped_and_counted_but_never_one_in_flight() -> None:
    clock, totals = Clock(), Counter[str]()
    book = EpisodeBook(LIMITS, totals, clock)
    a, _ = opened(book)
    c, d = opened(book)
    book.begin(c, "c")
    clock.t = 11
    assert book.sweep() == 1  # a's group; c's has a turn in flight
    with pytest.raises(BookError):
        book.begin(a, "c")
    book.end_turn(c, "c")
    book.drop(c, "c", "prefix_mismatch")
    with pytest.raises(BookError):
        book.reward(d, "c", 1)
    m = book.metrics()
    assert m["http/episodes_dropped/idle"] == 2 and m["http/episodes_dropped/prefix_mismatch"] == 2
    assert totals["errors/prefix_mismatch"] == 1 and m["http/episodes_open"] == 0


API = ApiLimits(model="m", max_new_tokens=8, max_n=4, max_context_tokens=100)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "JSON object"),
        ({"model": "m", "prompt": "a", "max_tokens": 9}, "max_tokens"),
        ({"model": "m", "prompt": "a", "n": 0}, "'n' must be in 1..4"),
        ({"model": "x", "prompt": "a"}, "does not exist"),
        ({"model": "m", "prompt": "a", "wat": 1}, "Unrecognized request argument supplied: wat"),
        ({"model": "m", "prompt": "a", "top_p": 0.5}, "top_p"),
        ({"model": "m", "prompt": "a", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "a", "stop": ["x"] * 5}, "stop"),
        ({"model": "m", "prompt": "a", "logprobs": 5}, "logprobs"),
        ({"model": "m", "prompt": ["a", "b"]}, "several requests"),
        ({"model": "m", "prompt": list(range(101))}, "101 tokens"),
    ],
)
def test_requests_outside_the_bounds_are_refused_naming_the_argument(body: object, match: str) -> None:
    with pytest.raises(ApiError, match=match) as e:
        parse(body, "completions", API)
    assert 400 <= e.value.status < 500 and e.value.body()["error"]["message"]


def test_neutral_values_and_bookkeeping_arguments_pass() -> None:
    req = parse(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "top_p": 1,
            "user": "u",
            "stream": False,
            "max_completion_tokens": 3,
            "logprobs": True,
        },  # fmt: skip
        "chat",
        API,
    )
    assert req.max_tokens == 3 and req.logprobs and req.messages == [{"role": "user", "content": "hi"}]


def test_the_endpoint_off_loopback_needs_tokens_and_counts_episodes_as_multi_turn(tmp_path) -> None:
    from protocol.config import load_config
    from rollout_server.http import read_tokens

    with pytest.raises(ValueError, match="rollout.http_tokens_file"):
        load_config(None, ["rollout.http_port=8001", "rollout.http_host=0.0.0.0"])
    with pytest.raises(ValueError, match="set rollout.http_port too"):
        load_config(None, ["rollout.generate=false"])
    cfg = load_config(None, ["rollout.http_port=8001", "task.max_turns=3", "task.max_episode_tokens=50"])
    assert cfg.max_turns == 3 and cfg.max_completion_tokens == 50  # the selector lets such episodes through
    plain = load_config(None, ["task.max_turns=3", "task.max_episode_tokens=50"])
    assert plain.max_turns == 1 and plain.max_completion_tokens == plain.max_new_tokens
    tokens = tmp_path / "tokens"
    tokens.write_text("# a comment\n\n  abc  \ndef\n")
    assert read_tokens(str(tokens)) == {"abc": "token-3", "def": "token-4"}
    tokens.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_tokens(str(tokens))
    with pytest.raises(ValueError, match="cannot be read"):
        read_tokens(str(tmp_path / "missing"))
