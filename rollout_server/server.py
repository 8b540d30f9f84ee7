"""A rollout server: fetch the newest weights, sample scored groups, push them to the selector.

Start one alone (any machine; it needs only the selector's and the learner's addresses)::

    podsrl rollout --config configs/tiny.toml --server-id gpu-box-3 net.selector_host=10.0.0.5 net.learner_host=10.0.0.5

Between engine calls it drains weight announcements and loads the newest version. It never starts
a group while its weights lag the newest announced version by more than ``max_staleness``
(DESIGN.md): such a group could only be dropped. It exits on the learner's final announcement.
The model's config and tokenizer arrive with the first weights, so the server needs no model files;
the dataset file and any reward plug-in must be readable here (docs/TASKS.md). Rewards run in a
worker process with a hard timeout (``rollout_server/tasks/rewards.py``). The server named by
``eval.server`` also evaluates held-out prompts every ``eval.every`` versions (``eval/*`` metrics).
One plain loop; every wait is a bounded poll so heartbeats keep flowing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from protocol.auth import load_auth
from protocol.config import Config
from protocol.messages import (
    LEARNER_SILENT_S,
    Heartbeat,
    Hello,
    ProtocolError,
    ScoredGroup,
    Weights,
    WeightsAnnouncement,
    WeightsRequest,
    new_session,
)
from protocol.metrics import Monitor
from protocol.sockets import announce_subscriber, close, group_sender, recv, send, weight_client
from protocol.weights import unpack_files

log = logging.getLogger("podsrl.rollout")



class Stop(Exception):
    """The learner announced the end of the run, or we were asked to terminate."""


class RolloutServer:
    def __init__(self, cfg: Config, server_id: str, seed: int) -> None:
        from rollout_server.engine import build_engine

        self.cfg, self.server_id, self.seed = cfg, server_id, seed
        self.rng = np.random.default_rng(seed)
        self.engine = build_engine(cfg)
        self.task: Any = None  # built from the tokenizer that arrives with the first weights
        self.ctx = zmq.Context()
        auth = load_auth(cfg.net, "rollout", server_id)  # key: <net.keys_dir>/rollout/<server_id>.key_secret
        self.push = group_sender(self.ctx, cfg.net, auth)
        self.sub = announce_subscriber(self.ctx, cfg.net, auth)
        self.dealer = weight_client(self.ctx, cfg.net, auth)
        self.latest = -1  # newest version announced by the learner
        self.floor = 0  # versions below it were discarded by a learner restart: never generate with them
        self.learner_session: int | None = None  # a new one while we wait: our request died with the old learner
        self.learner_restarted = False
        self.heard_learner = time.monotonic()  # when the last announcement arrived
        self.session = new_session()  # a fresh identity per process
        self.groups_sent = 0  # also the next group's sequence number in this session
        self.state = "waiting_for_weights"
        self.last_beat = 0.0
        self.stopping = False
        self.counters = {"weights_rejected": 0, "send_waits": 0}
        self.reward_errors: Counter[str] = Counter()
        self.evaluates = cfg.eval.every > 0 and server_id == cfg.eval.server
        self.next_eval = 0
        self.monitor = Monitor(cfg.run.dir, f"rollout-{server_id}", tensorboard=False)

    # -- control plane -------------------------------------------------------------------------
    def poll_announcements(self) -> None:
        while self.sub.poll(0):
            try:
                _, msg = recv(self.sub, WeightsAnnouncement)
            except ProtocolError as e:
                log.warning("bad announcement rejected: %s", e)
                continue
            if msg.final:
                raise Stop
            self.heard_learner = time.monotonic()
            if msg.session != self.learner_session:
                self.learner_restarted = self.learner_session is not None
                self.learner_session = msg.session
            self.latest = max(self.latest, msg.version)
            self.floor = max(self.floor, msg.floor)
        if self.stopping:
            raise Stop

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_beat >= self.cfg.rollout.heartbeat_s:
            self.last_beat = now
            version = -1 if self.engine.version is None else self.engine.version
            beat = Heartbeat(server_id=self.server_id, version=version, groups_sent=self.groups_sent, state=self.state,
                             session=self.session)
            self._send(beat)

    def _send(self, msg: Hello | Heartbeat | ScoredGroup) -> None:
        """Send with back-pressure: wait (polling announcements) while the selector is not accepting."""
        waited = 0.0
        while not self.push.poll(int(self.cfg.net.send_timeout_s * 1000), zmq.POLLOUT):
            waited += self.cfg.net.send_timeout_s
            self.counters["send_waits"] += 1
            self.poll_announcements()
            if waited % 30 < self.cfg.net.send_timeout_s:
                log.info("selector at %s:%d not accepting for %.0fs (full buffer or not started)",
                         self.cfg.net.selector_host, self.cfg.net.group_port, waited)
        send(self.push, msg)

    def wait_while_learner_gone(self) -> None:
        """Generate nothing while the learner is silent: nothing can be trained until it is back, and
        a restarted learner may discard every version we hold. Groups made meanwhile would only queue
        on the groups link (its socket buffers hold thousands of small groups), and the selector would
        have to read through all of them before the first group the new learner can train."""
        if self.learner_session is None or time.monotonic() - self.heard_learner <= LEARNER_SILENT_S:
            return  # (before the first announcement, sync_weights waits for the learner)
        log.info("no announcement from the learner for %.0fs: generation paused until it is back",
                 time.monotonic() - self.heard_learner)
        self.state = "waiting_for_weights"
        t0 = time.monotonic()
        while time.monotonic() - self.heard_learner > LEARNER_SILENT_S:
            self.heartbeat()
            self.sub.poll(200)
            self.poll_announcements()
        log.info("the learner is back after %.1fs (version %d, floor %d)", time.monotonic() - t0, self.latest,
                 self.floor)
        self.state = "generating"

    def sync_weights(self) -> None:
        """Load the newest version; block only while our lag would make a group useless."""
        have = self.engine.version
        must = have is None or self.cfg.too_stale(self.latest, have) or have < self.floor
        if have is not None and not must and self.latest <= have:
            return
        self.state = "loading_weights" if not must else "waiting_for_weights"
        t0 = time.monotonic()
        self._request()
        self.learner_restarted = False  # this request goes to the learner we know of now
        deadline = t0 + self.cfg.net.weights_timeout_s
        while True:
            self.heartbeat()
            if self.dealer.poll(200):
                try:
                    _, w = recv(self.dealer, Weights)
                    if have is None or w.version > have:
                        self.state = "loading_weights"
                        self.heartbeat(force=True)  # loading a large model is a long silence otherwise
                        if self.task is None:
                            self.task = self._build_task(w)
                        self.engine.load(w)
                        self.latest = max(self.latest, w.version)
                        self.monitor.log(w.version, {"rollout/weights_load_s": time.monotonic() - t0,
                                                     "rollout/weights_mib": w.data.nbytes / 2**20})
                    break
                except ProtocolError as e:  # corrupt or malformed version: keep the old one, ask again
                    self.counters["weights_rejected"] += 1
                    log.warning("weights rejected (%s); requesting again", e)
                    self._request()
            self.poll_announcements()
            if self.learner_restarted:  # the request went to a learner that is gone: ask the new one now
                self.learner_restarted = False
                log.info("the learner restarted (version %d, floor %d): requesting its weights", self.latest,
                         self.floor)
                self._request()
                deadline = time.monotonic() + self.cfg.net.weights_timeout_s
            if time.monotonic() > deadline:
                if not must:
                    break
                log.info("waiting for weights from the learner at %s:%d (%.0fs)",
                         self.cfg.net.learner_host, self.cfg.net.weights_port, time.monotonic() - t0)
                deadline = time.monotonic() + self.cfg.net.weights_timeout_s
                self._request()
        self.state = "generating"

    def _request(self) -> None:
        send(self.dealer, WeightsRequest(version=-1, with_files=self.task is None))

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

    def sampling(self, temperature: float) -> Any:
        from rollout_server.engine import SamplingSpec

        t = self.task
        return SamplingSpec(max_new_tokens=self.cfg.max_new_tokens, temperature=temperature, stop_ids=t.stop_ids,
                            pad_id=t.pad_id, stop_strings=tuple(self.cfg.task.stop),
                            decode=t.tokenizer.decode if self.cfg.task.stop else None)

    # -- data plane ----------------------------------------------------------------------------
    def generate_groups(self) -> None:
        cfg = self.cfg.rollout
        version = self.engine.version
        assert version is not None
        prompts = self.task.next_prompts(cfg.prompts_per_call)
        t0 = time.monotonic()
        samples = self.engine.generate([p.ids for p in prompts], cfg.group_size, self.sampling(cfg.temperature),
                                       seed=int(self.rng.integers(2**62)))
        gen_s = time.monotonic() - t0
        scores, _ = self.task.score(prompts, samples.ids, cfg.group_size, on_wait=self.heartbeat)
        reward_s = time.monotonic() - t0 - gen_s
        self.reward_errors.update(scores.errors)
        n = cfg.group_size
        for i, prompt in enumerate(prompts):
            ids, lps = samples.ids[i * n:(i + 1) * n], samples.logprobs[i * n:(i + 1) * n]
            group = ScoredGroup(
                server_id=self.server_id, session=self.session, group_id=self.groups_sent, version=version,
                task=self.task.name,
                gen_seconds=gen_s / len(prompts), prompt_ids=prompt.ids,
                completion_ids=np.concatenate(ids), completion_lens=np.array([len(c) for c in ids], np.int32),
                logprobs=np.concatenate(lps), rewards=scores.rewards[i * n:(i + 1) * n])
            self._send(group)
            self.groups_sent += 1
        tokens = sum(len(c) for c in samples.ids)
        self.monitor.log(version, {
            "rollout/groups_sent": self.groups_sent, "rollout/tokens_per_s": tokens / gen_s,
            "rollout/reward_mean": float(scores.rewards.mean()), "time/generate": gen_s, "time/reward": reward_s,
            "rollout/completion_len_mean": tokens / len(samples.ids),
            "rollout/prompts_too_long": self.task.too_long, "rollout/reward_restarts": self.task.rewards.restarts,
            **{f"reward/fn/{k}": v for k, v in scores.per_function.items()},
            **{f"reward/errors/{k}": v for k, v in self.reward_errors.items()},
            **self.task.source.position(), **{f"rollout/{k}": v for k, v in self.counters.items()}})

    def maybe_evaluate(self) -> None:
        """On ``eval.server``: greedy (or ``eval.temperature``) completions of the held-out prompts,
        one per prompt, at version 0 and every ``eval.every`` versions (``eval/*`` metrics)."""
        version = self.engine.version
        if not self.evaluates or version is None or version < self.next_eval:
            return
        self.next_eval = (version // self.cfg.eval.every + 1) * self.cfg.eval.every
        prompts = self.task.eval_prompts()[:self.cfg.eval.prompts]
        if not prompts:
            log.warning("eval.every is set but there are no eval rows: set task.eval_dataset or task.eval_fraction")
            self.evaluates = False
            return
        t0 = time.monotonic()
        self.state = "evaluating"
        samples = self.engine.generate([p.ids for p in prompts], 1, self.sampling(self.cfg.eval.temperature),
                                       seed=self.cfg.run.seed)
        scores, _ = self.task.score(prompts, samples.ids, 1, on_wait=self.heartbeat)
        r = scores.rewards
        metrics = {"eval/reward_mean": float(r.mean()), "eval/pass@1": float((r >= self.cfg.eval.pass_threshold).mean()),
                   "eval/completion_len_mean": float(np.mean([len(c) for c in samples.ids])),
                   "eval/prompts": len(prompts), "time/eval": time.monotonic() - t0,
                   **{f"eval/fn/{k}": v for k, v in scores.per_function.items()}}
        self.monitor.log(version, metrics)
        log.info("eval at version %d: reward %.3f, pass@1 %.3f over %d prompts", version, metrics["eval/reward_mean"],
                 metrics["eval/pass@1"], len(prompts))
        self.state = "generating"

    def run(self) -> None:
        self._send(Hello(server_id=self.server_id, host=socket.gethostname()[:255], pid=os.getpid(),
                         engine=self.cfg.rollout.engine.type, session=self.session))
        try:
            while True:
                self.poll_announcements()
                self.wait_while_learner_gone()
                self.sync_weights()
                self.heartbeat()
                self.maybe_evaluate()
                self.generate_groups()
        except Stop:
            log.info("%s stopping after %d groups", self.server_id, self.groups_sent)
        finally:
            if self.task is not None:
                self.task.close()
            close(self.push, self.sub, self.dealer)
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
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "stopping", True))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
