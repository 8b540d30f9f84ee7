"""The OpenAI-compatible endpoint of a real rollout server process, driven by the official ``openai`` client.

One server process for the module: the tiny model (version 0 published by a real ``WeightPublisher``), a
stand-in selector on the groups link that decodes what arrives (``rollout.generate=false``: every engine
call is the endpoint's) and checks each group with the selector's
own ``Bounds``. The tiny model's chat template is replaced by one that writes the end-of-turn token after an
assistant message, as Qwen's and Llama 3's do (``<|im_end|>``, ``<|eot_id|>``): with it a turn that ended at
EOS, sent back as the client's message, stitches (docs/TASKS.md, "Driving episodes over HTTP").
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import zmq
from helpers import ROOT, child_env, free_port, wait_for
from transformers import AutoTokenizer

from launcher.tiny import build_tiny_model
from learner.model import completion_logprobs, load_model
from learner.publisher import WeightPublisher
from protocol.config import Config, load_config, to_toml
from protocol.messages import Heartbeat, Hello, ProtocolError, ScoredEpisodes, ScoredGroup, WorkRequest
from protocol.sockets import close, group_receiver, recv
from protocol.weights import pack_weights, read_tokenizer_files
from selector.bounds import Bounds

pytestmark = pytest.mark.slow

TOKEN = "tok-3f9a1c"
ENDS_TURNS = (  # the tiny template, plus the end-of-turn token after an assistant message
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
EPISODE = "X-Podsrl-Episode"


@dataclass
class Served:
    cfg: Config
    url: str
    client: openai.OpenAI
    groups: queue.Queue[ScoredGroup]
    tokenizer: Any
    model: torch.nn.Module
    proc: subprocess.Popen
    log: Path

    def call(self, method: str, path: str, data: bytes | None, token: str = TOKEN) -> tuple[int, Any]:
        """(status, JSON body) of a raw request (urllib: bodies the openai client would never send)."""
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def post(self, path: str, body: Any = None, content: bytes | None = None) -> tuple[int, Any]:
        return self.call("POST", path, content if content is not None else json.dumps(body).encode())

    def reward(self, episode: str, r: float) -> tuple[int, Any]:
        return self.post(f"/podsrl/v1/episodes/{episode}/reward", {"reward": r})

    def metrics(self) -> dict[str, float]:
        return self.call("GET", "/podsrl/v1/metrics", None)[1]


def fake_selector(cfg: Config, groups: queue.Queue[ScoredGroup], stop: threading.Event) -> None:
    """The selector's side of the groups link: decode everything, keep the groups (checked by the selector's
    bounds; a group that fails them is put as its ProtocolError)."""
    ctx = zmq.Context()
    rx = group_receiver(ctx, cfg.net)
    bounds = Bounds(cfg, version=0, vocab_size=10_000)
    msg: Any
    try:
        while not stop.is_set():
            if rx.poll(100):
                _, msg = recv(rx, (ScoredGroup, ScoredEpisodes, Hello, Heartbeat, WorkRequest), routed=True)
                if isinstance(msg, ScoredGroup):
                    try:
                        bounds.check(msg)
                    except ProtocolError as e:
                        groups.put(e)  # type: ignore[arg-type]  # the test fails on it
                        continue
                    groups.put(msg)
    finally:
        close(rx)
        ctx.term()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("http")
    (tmp / "tokens").write_text(f"# clients\n{TOKEN}\n")
    port = free_port()
    ports = [f"net.{k}_port={free_port()}" for k in ("group", "batch", "announce", "weights")]
    overrides = [
        f"run.dir={tmp / 'run'}",
        *ports,
        f"rollout.http_port={port}",
        f"rollout.http_tokens_file={tmp / 'tokens'}",
        "rollout.group_size=2",
        "selector.keep=2",
        "rollout.max_new_tokens=5",
        "task.max_turns=3",
        "rollout.generate=false",
        "task.max_episode_tokens=64",  # the template's role markers are environment tokens too
    ]
    cfg = load_config(None, overrides)
    build_tiny_model(cfg, cfg.model_dir, alphabet="abcdefghijklmnopqrstuvwxyz: \n=")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    tokenizer.chat_template = ENDS_TURNS
    tokenizer.save_pretrained(cfg.model_dir)
    model = load_model(cfg.model_dir, torch.device("cpu"))
    (tmp / "config.toml").write_text(to_toml(cfg))
    ctx = zmq.Context()
    pub = WeightPublisher(ctx, cfg.net, files=read_tokenizer_files(cfg.model_dir), vocab_size=len(tokenizer))
    pub.publish(pack_weights(model.state_dict(), 0, model.config.to_json_string()))
    groups: queue.Queue[ScoredGroup] = queue.Queue()
    stop = threading.Event()
    selector = threading.Thread(target=fake_selector, args=(cfg, groups, stop), daemon=True)
    selector.start()
    log = tmp / "rollout.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rollout_server.server", "--config", str(tmp / "config.toml"), "--server-id", "r0"],
            env=child_env(),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    s = Served(cfg, url, client, groups, tokenizer, model, proc, log)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return client.models.list().data[0].model_extra["podsrl_version"] == 0  # type: ignore[index]
        except openai.APIConnectionError:
            return False

    try:
        wait_for(ready, 120, "the endpoint to serve version 0", every_s=0.2, detail=lambda: log.read_text()[-3000:])
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            stop.set()
            selector.join(timeout=10)
            pub.close()
            ctx.term()


def recompute(s: Served, prompt: np.ndarray, completion: np.ndarray) -> np.ndarray:
    """The learner's log-probs of ``completion`` after ``prompt``, at the run's temperature."""
    with torch.no_grad():
        logp, _, _ = completion_logprobs(
            s.model,
            [torch.from_numpy(prompt.astype(np.int64))],
            [torch.from_numpy(completion.astype(np.int64))],
            s.cfg.rollout.temperature,
            torch.device("cpu"),
        )
    return logp[0, : len(completion)].numpy()


def test_models_list_names_the_model_and_the_version(served: Served) -> None:
    raw = served.client.models.with_raw_response.list()
    models = raw.parse()
    assert [m.id for m in models.data] == ["podsrl"]
    assert raw.headers["X-Podsrl-Version"] == "0"
    assert served.client.models.retrieve("podsrl").id == "podsrl"


def test_a_completion_carries_the_behaviour_logprobs_the_learner_recomputes(served: Served) -> None:
    out = served.client.completions.create(
        model="podsrl", prompt="abc=", max_tokens=5, n=2, logprobs=1, seed=7, extra_body={"return_token_ids": True}
    )
    assert out.system_fingerprint == "podsrl-v0" and out.model_extra["podsrl"]["version"] == 0  # type: ignore[index]
    prompt = np.asarray(out.model_extra["prompt_token_ids"])  # type: ignore[index]
    assert prompt.tolist() == served.tokenizer("abc=")["input_ids"]
    for choice in out.choices:
        ids = np.asarray(choice.model_extra["token_ids"])  # type: ignore[index]
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        lps = np.asarray(choice.logprobs.token_logprobs, np.float32)
        assert 1 <= len(ids) == len(lps) <= 5
        assert choice.text == served.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        np.testing.assert_allclose(recompute(served, prompt, ids), lps, atol=2e-5)
    again = served.client.completions.create(model="podsrl", prompt="abc=", max_tokens=5, n=2, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # the seed fixes the sampling


def chat(served: Served, messages: list[dict[str, str]], episode: str, n: int = 1) -> Any:
    return served.client.chat.completions.create(
        model="podsrl",
        messages=messages,  # type: ignore[arg-type]
        n=n,
        max_tokens=4,
        logprobs=True,
        extra_headers={EPISODE: episode},
        extra_body={"return_token_ids": True},
    )


def test_a_two_turn_chat_episode_is_stitched_and_its_group_pushed_on_the_last_reward(served: Served) -> None:
    first = [{"role": "user", "content": "abc"}]
    out1 = chat(served, first, "new", n=2)
    episodes = out1.model_extra["podsrl"]["episodes"]
    prompt1 = np.asarray(out1.model_extra["prompt_token_ids"])
    assert len(episodes) == 2 and len(set(episodes)) == 2
    expected = []
    for episode, choice in zip(episodes, out1.choices, strict=True):
        turn1 = np.asarray(choice.model_extra["token_ids"])
        messages = [*first, {"role": "assistant", "content": choice.message.content}, {"role": "user", "content": "de"}]
        out2 = chat(served, messages, episode)
        assert out2.model_extra["podsrl"]["episodes"] == [episode]
        prompt2 = np.asarray(out2.model_extra["prompt_token_ids"])
        text = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt2.tolist() == served.tokenizer(text, add_special_tokens=False)["input_ids"]
        env = prompt2[len(prompt1) + len(turn1) :]
        assert np.array_equal(prompt2[: len(prompt1) + len(turn1)], np.concatenate([prompt1, turn1]))
        turn2 = np.asarray(out2.choices[0].model_extra["token_ids"])
        lps = [np.asarray([t.logprob for t in o.logprobs.content], np.float32) for o in (choice, out2.choices[0])]
        expected.append((turn1, env, turn2, lps))
    assert served.reward(episodes[0], 1.0) == (200, {"episode": episodes[0], "group_pushed": False})
    assert served.groups.empty()
    assert served.reward(episodes[1], 0.25) == (200, {"episode": episodes[1], "group_pushed": True})
    g = served.groups.get(timeout=30)
    assert isinstance(g, ScoredEpisodes), g  # a ProtocolError here: the selector's bounds refused it
    assert g.version == 0 and g.turns.tolist() == [2, 2] and g.rewards.tolist() == [1.0, 0.25]
    assert np.array_equal(g.prompt_ids, prompt1)
    at = 0
    for (turn1, env, turn2, lps), length in zip(expected, g.completion_lens.tolist(), strict=True):
        ids, mask = g.completion_ids[at : at + length], g.loss_mask[at : at + length]
        logprobs = g.logprobs[at : at + length]
        at += length
        assert np.array_equal(ids, np.concatenate([turn1, env, turn2]))  # the model's own tokens, and the client's
        assert mask.tolist() == [1] * len(turn1) + [0] * len(env) + [1] * len(turn2)
        np.testing.assert_array_equal(logprobs[mask == 1], np.concatenate(lps))
        assert not logprobs[mask == 0].any()
        # the stitched sequence is the context each turn was sampled in: the learner recomputes the same numbers
        np.testing.assert_allclose(recompute(served, g.prompt_ids, ids)[mask == 1], logprobs[mask == 1], atol=2e-5)
    status, gone = served.reward(episodes[0], 1.0)
    assert status == 404 and "episode" in gone["error"]["message"]


def test_a_re_templated_prompt_drops_the_group_and_is_counted(served: Served) -> None:
    before = served.metrics()
    first = [{"role": "user", "content": "abc"}]
    out = chat(served, first, "new", n=2)
    episodes = out.model_extra["podsrl"]["episodes"]
    edited = [*first, {"role": "assistant", "content": "zz" + out.choices[0].message.content}]
    with pytest.raises(openai.UnprocessableEntityError, match="does not start with the episode's tokens"):
        chat(served, [*edited, {"role": "user", "content": "d"}], episodes[0])
    after = served.metrics()
    assert after["env/errors/prefix_mismatch"] == before.get("env/errors/prefix_mismatch", 0) + 1
    assert after["http/episodes_dropped/prefix_mismatch"] == before.get("http/episodes_dropped/prefix_mismatch", 0) + 2
    with pytest.raises(openai.NotFoundError):  # the other episode of the group went with it
        chat(served, [*first, {"role": "assistant", "content": out.choices[1].message.content}], episodes[1])
    assert served.groups.empty()


def test_hostile_requests_get_4xx_and_the_server_keeps_serving(served: Served) -> None:
    c = served.client
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="podsrl", prompt="ab", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="'n' must be in 1..2"):
        c.completions.create(model="podsrl", prompt="ab", n=10_000)
    with pytest.raises(openai.APIStatusError, match="shorten the prompt") as big:
        c.completions.create(model="podsrl", prompt="a" * (1 << 20))
    assert big.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: foo"):
        c.completions.create(model="podsrl", prompt="ab", extra_body={"foo": 1})
    with pytest.raises(openai.BadRequestError, match="stream"):
        c.chat.completions.create(model="podsrl", messages=[{"role": "user", "content": "a"}], stream=True)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4o", prompt="ab")
    with pytest.raises(openai.AuthenticationError, match="Bearer"):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    status, bad = served.post("/v1/completions", content=b'{"model": "podsrl", "prompt": ')
    assert status == 400 and "JSON" in bad["error"]["message"]
    assert served.post("/v1/completions", content=b"[" * 100_000)[0] == 400
    assert served.post("/v1/nothing", {})[0] == 404
    assert served.reward("ep-none-0", 1.0)[0] == 404
    assert served.post("/podsrl/v1/episodes/x/reward", {"reward": 1e300})[0] == 422
    out = c.completions.create(model="podsrl", prompt="ab", max_tokens=2)
    assert out.choices and served.proc.poll() is None
    m = served.metrics()
    assert m["http/errors/400"] >= 6 and m["http/errors/401"] >= 1 and m["http/errors/413"] >= 1


def test_the_example_agent_plays_a_group_that_the_selector_accepts(served: Served) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from http_agent import play_group
    finally:
        sys.path.remove(str(ROOT / "examples"))
    rewards = play_group(served.client, served.url, TOKEN, "abc=", "abc", 2)
    g = served.groups.get(timeout=30)
    assert isinstance(g, ScoredEpisodes), g
    assert g.rewards.tolist() == np.asarray(rewards, np.float32).tolist()  # the wire's rewards are float32
    assert g.turns.tolist() == [2, 2] and (g.loss_mask == 0).any()
