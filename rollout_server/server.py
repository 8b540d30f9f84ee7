"""A rollout server: fetch the newest weights, sample scored groups, push them to the selector.

Start one alone (any machine; it needs only the selector's and the learner's addresses)::

    podsrl rollout --config configs/tiny.toml --server-id gpu-box-3 net.selector_host=10.0.0.5 net.learner_host=10.0.0.5

Two threads. The control plane is an asyncio loop (uvloop) that alone owns the sockets: it reads
weight announcements, sends heartbeats every ``rollout.heartbeat_s`` and groups as they are made,
and fetches each new version in the background through its weights client
(``rollout_server/weights_client.py``: the weights sources, a delta from the version held when the
learner still keeps it, shared memory on the learner's machine). Generation,
scoring and loading a version into the engine run in one worker thread, so a version is swapped in
only between engine calls, and a long load or generation never silences the heartbeats.

With ``rollout.pacing = "credits"`` (the default) it asks the selector for work before each engine
call (a ``WorkRequest`` with the version its engine runs, on the groups link) and generates only what
it is granted, waiting otherwise (``rollout/idle_s``); ``"free"`` generates without asking
(docs/ARCHITECTURE.md, "Pacing"). It never starts a group while its weights lag the newest announced version by
more than
``max_staleness`` (DESIGN.md): such a group could only be dropped. Then, and before the first
version, it waits for the fetch. ``weights.background = false`` is the older stop-and-fetch mode:
fetch and load between engine calls, generating nothing meanwhile. It exits on the learner's final
announcement, and stops with exit code 3 when the selector refuses its server id for good (a
``Refusal``: another live process holds the id, or the id is not the one its key was made for). The
model's config and tokenizer arrive with the first weights, so the server needs
no model files; the dataset file and any reward plug-in must be readable here (docs/TASKS.md).
Rewards run in a worker process with a hard timeout (``rollout_server/tasks/rewards.py``). The server
named by ``eval.server`` also evaluates held-out prompts every ``eval.every`` versions (``eval/*``).
With ``rollout.http_port`` it also serves an OpenAI-compatible endpoint on the same loop and engine
(``rollout_server/http.py``); with ``rollout.generate = false``, only that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import zmq
import zmq.asyncio

from protocol.auth import load_auth
from protocol.config import Config
from protocol.messages import (
    Heartbeat,
    Hello,
    ProtocolError,
    Refusal,
    ScoredEpisodes,
    ScoredGroup,
    Weights,
    WorkGrant,
    WorkRequest,
    new_session,
)
from protocol.metrics import Monitor, RateLimitedLog
from protocol.sockets import arecv, asend, close, group_sender
from protocol.weights import unpack_files
from rollout_server.sampling import SamplingSpec
from rollout_server.weights_client import WeightsClient

if TYPE_CHECKING:
    from rollout_server.http import HttpEndpoint

log = logging.getLogger("podsrl.rollout")
T = TypeVar("T")
ASK_AGAIN_S = 2.0  # pacing: re-send an unanswered work request this often (the selector may have restarted)


class Stop(Exception):
    """The learner announced the end of the run, or we were asked to terminate."""


REFUSED_EXIT = 3  # the exit code of a server the selector refused for good


class Refused(Exception):
    """The selector refused this server's id for good; the message says why and what to do."""


def refused_message(refusal: Refusal) -> str:
    """What a refused server says as it stops: its id, the other holder (or its key's id), the fix."""
    sid = refusal.server_id
    if refusal.reason == "server_id_in_use":
        return (
            f"the selector refused server id {sid!r}: another live rollout server uses it "
            f"({refusal.detail}). Start this one with --server-id ANOTHER_NAME (with authentication on, "
            "make its key first: podsrl keys DIR --rollout ANOTHER_NAME)"
        )
    return f"the selector refused server id {sid!r} ({refusal.reason}): {refusal.detail}"


@dataclass
class Produced:
    """One engine call's groups, made in the worker thread and sent by the loop."""

    groups: list[ScoredGroup]
    metrics: dict[str, Any] = field(default_factory=dict)


class RolloutServer:
    def __init__(self, cfg: Config, server_id: str, seed: int) -> None:
        from rollout_server.engine import build_engine

        self.cfg, self.server_id, self.seed = cfg, server_id, seed
        self.rng = np.random.default_rng(seed)
        self.engine = build_engine(cfg)
        self.task: Any = None  # built from the tokenizer that arrives with the first weights
        self.ctx = zmq.asyncio.Context()
        auth = load_auth(cfg.net, "rollout", server_id)  # key: <net.keys_dir>/rollout/<server_id>.key_secret
        # the builders make their sockets with this asyncio context, so they are asyncio sockets
        self.push = cast(zmq.asyncio.Socket, group_sender(self.ctx, cfg.net, auth))
        self.session = new_session()  # a fresh identity per process
        self.groups_sent = 0  # also the next group's sequence number in this session
        self.state = "waiting_for_weights"
        self.counters: Counter[str] = Counter()
        self.reward_errors: Counter[str] = Counter()
        self.env_counters: Counter[str] = Counter()  # env/* over the server's life (rollout_server/episodes.py)
        self.evaluates = cfg.eval.every > 0 and server_id == cfg.eval.server
        self.next_eval = 0
        self.monitor = Monitor(cfg.run.dir, f"rollout-{server_id}", tensorboard=False)
        self._warn = RateLimitedLog(log, every_s=30.0)
        device = getattr(self.engine, "device", None)
        self.weights = WeightsClient(self.ctx, cfg, auth, device, self.monitor, self._warn, lambda: self.task is None)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._stop: asyncio.Event | None = None
        self._grants: deque[tuple[WorkGrant, float]] = deque()  # pacing: (grant, when its lease ends)
        self._granted = asyncio.Event()
        self._asked: tuple[int, int, float] | None = None  # the request in flight: (id, version, sent at)
        self._requests = 0
        self.idle_s = 0.0  # pacing: time spent waiting for work
        self._group_lock = asyncio.Lock()
        self.http: HttpEndpoint | None = None
        if cfg.rollout.http_port:
            from rollout_server.http import HttpEndpoint

            self.http = HttpEndpoint(cfg, self, self.monitor, seed + 1)

    # -- the worker thread ---------------------------------------------------------------------
    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def install(self, w: Weights) -> dict[str, Any]:
        """(worker) Load a verified version into the engine; build the task with the first one."""
        t0 = time.monotonic()
        if self.task is None:
            self.task = self._build_task(w)
        self.weights.load(self.engine, w)
        return {"rollout/weights_install_s": time.monotonic() - t0, "rollout/weights_mib": w.data.nbytes / 2**20}

    def _build_task(self, w: Weights) -> Any:
        """The task, with the tokenizer the learner sent (written to a scratch directory and loaded)."""
        from transformers import AutoTokenizer

        from rollout_server.tasks import Task

        files = unpack_files(w)
        if not files:
            raise RuntimeError("the learner sent no tokenizer files; is it an older podsrl?")
        with tempfile.TemporaryDirectory(prefix="podsrl-tokenizer-") as tmp:
            for name, blob in files.items():
                (Path(tmp) / name).write_bytes(blob)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        task = Task(self.cfg, tokenizer, json.loads(w.model_config), self.seed)
        log.info("task %s: stop ids %s, vocabulary %d", task.name, task.stop_ids, len(tokenizer))
        return task

    def sampling(self, temperature: float) -> SamplingSpec:
        t = self.task
        return SamplingSpec(
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=temperature,
            stop_ids=t.stop_ids,
            pad_id=t.pad_id,
            stop_strings=tuple(self.cfg.task.stop),
            decode=t.tokenizer.decode if self.cfg.task.stop else None,
        )

    def produce(self, num_prompts: int, n: int) -> Produced:
        """(worker) One engine call: sample ``num_prompts`` groups of ``n``, score them, make the messages."""
        version = self.engine.version
        assert version is not None
        prompts = self.task.next_prompts(num_prompts)
        if self.cfg.task.environment:
            return self.produce_episodes(prompts, n, version)
        t0 = time.monotonic()
        samples = self.engine.generate(
            [p.ids for p in prompts], n, self.sampling(self.cfg.rollout.temperature), seed=int(self.rng.integers(2**62))
        )
        gen_s = time.monotonic() - t0
        scores, _ = self.task.score(prompts, samples.ids, n)
        reward_s = time.monotonic() - t0 - gen_s
        self.reward_errors.update(scores.errors)
        groups = []
        for i, prompt in enumerate(prompts):
            ids, lps = samples.ids[i * n : (i + 1) * n], samples.logprobs[i * n : (i + 1) * n]
            groups.append(
                ScoredGroup(
                    server_id=self.server_id,
                    session=self.session,
                    group_id=0,  # set when sent (_send_group)
                    version=version,
                    task=self.task.name,
                    gen_seconds=gen_s / len(prompts),
                    prompt_ids=prompt.ids,
                    completion_ids=np.concatenate(ids),
                    completion_lens=np.array([len(c) for c in ids], np.int32),
                    logprobs=np.concatenate(lps),
                    rewards=scores.rewards[i * n : (i + 1) * n],
                )
            )
        tokens = sum(len(c) for c in samples.ids)
        return Produced(
            groups,
            {
                "rollout/tokens_per_s": tokens / gen_s,
                "rollout/reward_mean": float(scores.rewards.mean()),
                "time/generate": gen_s,
                "time/reward": reward_s,
                "rollout/completion_len_mean": tokens / len(samples.ids),
                "rollout/prompts_too_long": self.task.too_long,
                "rollout/reward_restarts": self.task.rewards.restarts,
                "reward/output_dropped_bytes": self.task.rewards.output.dropped,
                **{f"reward/fn/{k}": v for k, v in scores.per_function.items()},
                **{f"reward/errors/{k}": v for k, v in self.reward_errors.items()},
                **self.task.source.position(),
            },
        )

    def produce_episodes(self, prompts: list[Any], n: int, version: int) -> Produced:
        """(worker) ``produce`` with ``task.environment``: n multi-turn episodes per prompt (episodes.py)."""
        from rollout_server.episodes import play

        seed = int(self.rng.integers(2**62))
        spec = self.sampling(self.cfg.rollout.temperature)
        parts, metrics, errors = play(self.engine, self.task, self.cfg, prompts, n, spec, seed, self.env_counters)
        self.reward_errors.update(errors)
        groups: list[ScoredGroup] = [self.episodes_message({**part, "version": version}) for part in parts]
        return Produced(groups, {**metrics, **{f"reward/errors/{k}": v for k, v in self.reward_errors.items()}})

    def episodes_message(self, part: dict[str, Any]) -> ScoredEpisodes:
        """A group of episodes (``part``: its fields but the server's identity; its sequence number is set
        when it is sent), from this server's engine calls or from the HTTP endpoint's episodes."""
        return ScoredEpisodes(server_id=self.server_id, session=self.session, group_id=0, task=self.task.name, **part)

    def evaluate(self) -> dict[str, Any] | None:
        """(worker) On ``eval.server``: greedy (or ``eval.temperature``) completions of the held-out prompts,
        one per prompt, at version 0 and every ``eval.every`` versions (``eval/*`` metrics)."""
        version = self.engine.version
        if not self.evaluates or version is None or version < self.next_eval:
            return None
        self.next_eval = (version // self.cfg.eval.every + 1) * self.cfg.eval.every
        prompts = self.task.eval_prompts()[: self.cfg.eval.prompts]
        if not prompts:
            log.warning("eval.every is set but there are no eval rows: set task.eval_dataset or task.eval_fraction")
            self.evaluates = False
            return None
        t0 = time.monotonic()
        spec = self.sampling(self.cfg.eval.temperature)
        if self.cfg.task.environment:  # an episode per prompt, played as in training
            from rollout_server.episodes import EpisodeStats, run_episodes, score_episodes

            episodes, _ = run_episodes(self.engine, self.task, self.cfg, prompts, 1, spec, self.cfg.run.seed)
            r, scores = score_episodes(self.task, episodes, self.cfg.selector.max_abs_reward, EpisodeStats())
            lengths = [e.length for e in episodes]
        else:
            samples = self.engine.generate([p.ids for p in prompts], 1, spec, seed=self.cfg.run.seed)
            scores, _ = self.task.score(prompts, samples.ids, 1)
            r, lengths = scores.rewards, [len(c) for c in samples.ids]
        metrics = {
            "eval/reward_mean": float(r.mean()),
            "eval/pass@1": float((r >= self.cfg.eval.pass_threshold).mean()),
            "eval/completion_len_mean": float(np.mean(lengths)),
            "eval/prompts": len(prompts),
            "time/eval": time.monotonic() - t0,
            **{f"eval/fn/{k}": v for k, v in (scores.per_function.items() if scores is not None else ())},
        }
        log.info(
            "eval at version %d: reward %.3f, pass@1 %.3f over %d prompts",
            version,
            metrics["eval/reward_mean"],
            metrics["eval/pass@1"],
            len(prompts),
        )
        return metrics

    # -- the control plane ---------------------------------------------------------------------
    async def _announcements(self) -> None:
        await self.weights.listen()  # returns on the learner's final announcement
        self._request_stop()

    async def _heartbeats(self) -> None:
        while True:
            version = -1 if self.engine.version is None else self.engine.version
            await self._send(
                Heartbeat(
                    server_id=self.server_id,
                    version=version,
                    groups_sent=self.groups_sent,
                    state=self.state,
                    session=self.session,
                )
            )
            await asyncio.sleep(self.cfg.rollout.heartbeat_s)

    async def _send(self, msg: Hello | Heartbeat | ScoredGroup | WorkRequest) -> None:
        """Send with back-pressure: wait (heartbeats and fetches go on) while the selector is not accepting."""
        waited = 0.0
        timeout = self.cfg.net.send_timeout_s
        while True:
            if self._stop is not None and self._stop.is_set():  # the run is over: nobody will read it
                raise asyncio.CancelledError
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation
                # that stops the server, and this loop would then wait on a selector that is gone
                async with asyncio.timeout(timeout):
                    await asend(self.push, msg)
                return
            except TimeoutError:
                waited += timeout
                self.counters["send_waits"] += 1
                if waited % 30 < timeout:
                    log.info(
                        "selector at %s:%d not accepting for %.0fs (full buffer or not started)",
                        self.cfg.net.selector_host,
                        self.cfg.net.group_port,
                        waited,
                    )

    async def _weights(self) -> None:
        """Swap in the newest fetched version; wait only while generating now would be useless."""
        weights = self.weights
        waited_since = time.monotonic()
        while True:
            if weights.learner_gone():  # nothing can be trained until it is back; it may discard our versions
                self.state = "waiting_for_weights"
                await weights.learner_back()
            if not self.cfg.weights.background and weights.behind():
                self.state = "loading_weights"
                await weights.fetch_now()
            ready = weights.newer(self.engine.version)
            if ready is not None:
                self.state = "loading_weights"
                await weights.install(ready, functools.partial(self.in_worker, self.install))
                await self._evaluate()  # every version loaded is evaluated when due, even one too stale to use
            if weights.usable(self.engine.version) and not weights.learner_gone():
                self.state = "generating"
                return
            self.state = "waiting_for_weights"
            if time.monotonic() - waited_since > self.cfg.net.weights_timeout_s:
                log.info(
                    "waiting for weights from the learner at %s:%d (have v%d, newest v%d, floor %d)",
                    self.cfg.net.learner_host,
                    self.cfg.net.weights_port,
                    weights.have(),
                    weights.latest,
                    weights.floor,
                )
                waited_since = time.monotonic()
            await weights.next_version()

    async def _replies(self) -> None:
        """The selector's answers on the groups link: grants of our work requests (pacing), or a
        ``Refusal`` of our id, which stops the server (:class:`Refused`)."""
        reply: WorkGrant | Refusal
        while True:
            try:
                _, reply = await arecv(self.push, (WorkGrant, Refusal))
                if isinstance(reply, Refusal):
                    self._check_refusal(reply)
                    raise Refused(refused_message(reply))
                grant = reply
                self._check_grant(grant)
            except ProtocolError as e:
                self.counters["grants_rejected"] += 1
                self._warn(e.reason, "bad answer from the selector rejected: %s", e)
                continue
            if self._asked is not None and grant.request_id == self._asked[0]:
                self._asked = None
            self._grants.append((grant, time.monotonic() + grant.lease_s))
            self._granted.set()

    def _check_refusal(self, refusal: Refusal) -> None:
        if refusal.server_id != self.server_id:  # not about us: nothing to stop for
            raise ProtocolError("grant", f"a refusal of server id {refusal.server_id!r}, this is {self.server_id!r}")

    def _check_grant(self, grant: WorkGrant) -> None:
        """Well-formed is not enough: more prompts than asked for, or another group size than this run's,
        would make groups the selector rejects (or an engine call of absurd size)."""
        cfg = self.cfg.rollout
        if grant.prompts > cfg.prompts_per_call or not cfg.group_size <= grant.group_size <= self.cfg.max_group_size:
            raise ProtocolError(
                "grant",
                f"grant of {grant.prompts} prompts x {grant.group_size}: this server asks "
                f"for at most {cfg.prompts_per_call} x {self.cfg.max_group_size} (rollout.group_size="
                f"{cfg.group_size}, rollout.surplus={cfg.surplus!r})",
            )

    async def _work(self) -> tuple[int, int]:
        """The (prompts, group size) of the next engine call: ``prompts_per_call`` x ``group_size`` when
        pacing is free; otherwise what the selector grants, (0, 0) meaning none yet (look at the weights
        and ask again). A request carries the version the engine runs, which is the version it will
        generate with: weights are swapped only in ``_weights``, before the request."""
        cfg = self.cfg.rollout
        if not cfg.generate:  # HTTP only: look at the weights again when a newer version is fetched
            self.weights.fetched.clear()
            if self.weights.ready is None:
                self.state = "waiting_for_work"
                await self.weights.wait(1.0, self.weights.fetched)
            return 0, 0
        if cfg.pacing == "free":
            return cfg.prompts_per_call, cfg.group_size
        self._granted.clear()
        self.weights.fetched.clear()
        if self.weights.ready is not None:  # newer weights are here: swap them in first, then generate or ask
            return 0, 0
        now = time.monotonic()
        while self._grants:
            grant, ends = self._grants.popleft()
            if ends > now:
                self.counters["grants"] += 1
                return grant.prompts, grant.group_size
            self.counters["grants_expired"] += 1  # the selector gave that capacity to others meanwhile
        version = self.engine.version
        assert version is not None
        asked = self._asked
        if asked is None or asked[1] != version or now - asked[2] > ASK_AGAIN_S:
            same = asked is not None and asked[1] == version  # the same request again: granted at most once
            rid = asked[0] if asked is not None and same else self._requests
            self._requests += not same
            self._asked = (rid, version, now)
            await self._send(
                WorkRequest(
                    server_id=self.server_id,
                    session=self.session,
                    request_id=rid,
                    version=version,
                    prompts=cfg.prompts_per_call,
                )
            )
        self.state = "waiting_for_work"
        t0 = time.monotonic()
        await self.weights.wait(0.5, self._granted, self.weights.fetched)
        self.idle_s += time.monotonic() - t0
        return 0, 0

    async def _evaluate(self) -> None:
        """``eval.server`` only: evaluate the version just loaded when one is due (right after loading it:
        a server that waits for work, or loads a newer version at once, still evaluates this one)."""
        if self.evaluates:
            self.state = "evaluating"
            metrics = await self.in_worker(self.evaluate)
            if metrics is not None:
                self.monitor.log(self.engine.version or 0, metrics)

    async def _send_group(self, group: ScoredGroup) -> None:
        """Send a group as the next of this session's sequence (the selector drops one at or below the last
        it saw): groups of the server's own engine calls and of the HTTP endpoint go one at a time."""
        async with self._group_lock:
            await self._send(dataclasses.replace(group, group_id=self.groups_sent))
            self.groups_sent += 1

    async def push_episodes(self, part: dict[str, Any]) -> None:
        """(HTTP endpoint) A complete group of episodes driven over HTTP (``rollout_server/http_episodes.py``)."""
        await self._send_group(self.episodes_message(part))

    async def _generate(self, num_prompts: int, n: int) -> None:
        self.state = "generating"
        produced = await self.in_worker(self.produce, num_prompts, n)
        for group in produced.groups:
            await self._send_group(group)
        self.monitor.log(
            produced.groups[0].version if produced.groups else 0,
            {
                **produced.metrics,
                "rollout/groups_sent": self.groups_sent,
                "rollout/idle_s": self.idle_s,
                **{f"rollout/{k}": v for k, v in (self.counters + self.weights.all_counters()).items()},
            },
        )

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not in the main thread (tests)
            loop.add_signal_handler(signal.SIGTERM, self._request_stop)
        helpers = [asyncio.ensure_future(self._announcements())]  # first: a final announcement stops even the Hello
        if self.cfg.weights.background:
            helpers.append(asyncio.ensure_future(self.weights.keep_fetching()))

        # before the Hello: a refusal may answer it (both pacing modes; grants come only when asked for)
        helpers.append(asyncio.ensure_future(self._replies()))
        if self.http is not None:  # answers "no weights yet" (503) until the first version is loaded
            await self.http.start()
            helpers.append(asyncio.ensure_future(self.http.sweep_forever()))

        async def work() -> None:
            await self._send(
                Hello(
                    server_id=self.server_id,
                    host=socket.gethostname()[:255],
                    pid=os.getpid(),
                    engine=self.cfg.rollout.engine.type,
                    session=self.session,
                )
            )
            helpers.append(asyncio.ensure_future(self._heartbeats()))  # after the Hello, as the selector expects
            while True:
                await self._weights()
                prompts, n = await self._work()
                if prompts:
                    await self._generate(prompts, n)

        main = asyncio.ensure_future(work())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({main, stop, *helpers}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and not t.cancelled():
                    t.result()  # a crash of any part is the server's crash
        finally:
            self._stop.set()
            for t in (main, stop, *helpers):
                t.cancel()
            # bounded: a part stuck where a cancellation cannot reach must not keep the process alive
            await asyncio.wait({main, stop, *helpers}, timeout=10)
            if self.http is not None:
                await self.http.close()

    def run(self) -> None:
        import uvloop

        try:
            uvloop.run(self._main())
            log.info(
                "%s stopping after %d groups (%.1fs waiting for work)", self.server_id, self.groups_sent, self.idle_s
            )
        finally:
            # the server's own counts, for the run's accounting (launcher/accounting.py)
            self.monitor.log(
                self.engine.version or 0,
                {
                    "total/groups_sent": self.groups_sent,
                    "total/idle_s": self.idle_s,
                    "total/grants": self.counters["grants"],
                },
            )
            self._worker.shutdown(wait=True)  # an engine call in flight finishes first
            if self.task is not None:
                self.task.close()
            close(self.push)
            self.weights.close()
            self.ctx.term()
            self.monitor.close()


def main(argv: list[str] | None = None) -> int:
    from protocol.cli import configure, process_parser

    parser = process_parser("podsrl rollout", __doc__)
    parser.add_argument("--server-id", default=f"{socket.gethostname()}-{os.getpid()}", help="unique name")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: run.seed + pid)")
    args = parser.parse_args(argv)
    cfg = configure(args, role=f"rollout-{args.server_id}")
    import torch

    torch.set_num_threads(cfg.rollout.threads)
    server = RolloutServer(cfg, args.server_id, args.seed if args.seed is not None else cfg.run.seed + os.getpid())
    try:
        server.run()
    except Refused as e:
        log.error("%s", e)  # on stderr (protocol/cli.py), where whoever started it looks
        return REFUSED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
