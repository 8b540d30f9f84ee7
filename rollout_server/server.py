"""A rollout server: fetch the newest weights, sample scored groups, push them to the selector.

Start one alone (any machine; it needs only the selector's and the learner's addresses)::

    podsrl rollout --config configs/tiny.toml --server-id gpu-box-3 net.selector_host=10.0.0.5 net.learner_host=10.0.0.5

Between engine calls it drains weight announcements and loads the newest version. It never starts
a group while its weights lag the newest announced version by more than ``max_staleness``
(DESIGN.md): such a group could only be dropped. It exits on the learner's final announcement.
One plain loop, no threads; every wait is a bounded poll so heartbeats keep flowing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

import numpy as np
import zmq

from protocol.config import Config
from protocol.messages import (
    Heartbeat,
    Hello,
    ProtocolError,
    ScoredGroup,
    Weights,
    WeightsAnnouncement,
    WeightsRequest,
)
from protocol.metrics import Monitor
from protocol.sockets import announce_subscriber, close, group_sender, recv, send, weight_client

log = logging.getLogger("podsrl.rollout")


class Stop(Exception):
    """The learner announced the end of the run, or we were asked to terminate."""


class RolloutServer:
    def __init__(self, cfg: Config, server_id: str, seed: int) -> None:
        from rollout_server.engine import build_engine
        from rollout_server.tasks import build_task

        self.cfg, self.server_id = cfg, server_id
        self.rng = np.random.default_rng(seed)
        self.task = build_task(cfg.task)
        self.engine = build_engine(cfg)
        self.ctx = zmq.Context()
        self.push = group_sender(self.ctx, cfg.net)
        self.sub = announce_subscriber(self.ctx, cfg.net)
        self.dealer = weight_client(self.ctx, cfg.net)
        self.latest = -1  # newest version announced by the learner
        self.groups_sent = 0
        self.state = "waiting_for_weights"
        self.last_beat = 0.0
        self.stopping = False
        self.counters = {"weights_rejected": 0, "send_waits": 0}
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
            self.latest = max(self.latest, msg.version)
        if self.stopping:
            raise Stop

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_beat >= self.cfg.rollout.heartbeat_s:
            self.last_beat = now
            version = -1 if self.engine.version is None else self.engine.version
            beat = Heartbeat(server_id=self.server_id, version=version, groups_sent=self.groups_sent, state=self.state)
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

    def sync_weights(self) -> None:
        """Load the newest version; block only while our lag would make a group useless."""
        have = self.engine.version
        must = have is None or self.cfg.too_stale(self.latest, have)
        if not must and self.latest <= have:
            return
        self.state = "loading_weights" if not must else "waiting_for_weights"
        t0 = time.monotonic()
        send(self.dealer, WeightsRequest(version=-1))
        deadline = t0 + self.cfg.net.weights_timeout_s
        while True:
            self.heartbeat()
            if self.dealer.poll(200):
                try:
                    _, w = recv(self.dealer, Weights)
                    if have is None or w.version > have:
                        self.state = "loading_weights"
                        self.heartbeat(force=True)  # loading a large model is a long silence otherwise
                        self.engine.load(w)
                        self.latest = max(self.latest, w.version)
                        self.monitor.log(w.version, {"rollout/weights_load_s": time.monotonic() - t0,
                                                     "rollout/weights_mib": w.data.nbytes / 2**20})
                    break
                except ProtocolError as e:  # corrupt or malformed version: keep the old one, ask again
                    self.counters["weights_rejected"] += 1
                    log.warning("weights rejected (%s); requesting again", e)
                    send(self.dealer, WeightsRequest(version=-1))
            self.poll_announcements()
            if time.monotonic() > deadline:
                if not must:
                    break
                log.info("waiting for weights from the learner at %s:%d (%.0fs)",
                         self.cfg.net.learner_host, self.cfg.net.weights_port, time.monotonic() - t0)
                deadline = time.monotonic() + self.cfg.net.weights_timeout_s
                send(self.dealer, WeightsRequest(version=-1))
        self.state = "generating"

    # -- data plane ----------------------------------------------------------------------------
    def generate_groups(self) -> None:
        cfg = self.cfg.rollout
        version = self.engine.version
        assert version is not None
        prompts = [self.task.sample_prompt(self.rng) for _ in range(cfg.prompts_per_call)]
        t0 = time.monotonic()
        samples = self.engine.generate(prompts, cfg.group_size, self.cfg.max_new_tokens, cfg.temperature,
                                       seed=int(self.rng.integers(2**62)))
        gen_s = time.monotonic() - t0
        n = cfg.group_size
        rewards_all = []
        for i, prompt in enumerate(prompts):
            ids, lps = samples.ids[i * n:(i + 1) * n], samples.logprobs[i * n:(i + 1) * n]
            rewards = np.array([self.task.score(prompt, c) for c in ids], dtype=np.float32)
            rewards_all.append(rewards)
            group = ScoredGroup(
                server_id=self.server_id, group_id=self.groups_sent, version=version, task=self.task.name,
                gen_seconds=gen_s / len(prompts), prompt_ids=prompt,
                completion_ids=np.concatenate(ids), completion_lens=np.array([len(c) for c in ids], np.int32),
                logprobs=np.concatenate(lps), rewards=rewards)
            self._send(group)
            self.groups_sent += 1
        tokens = sum(len(c) for c in samples.ids)
        self.monitor.log(version, {"rollout/groups_sent": self.groups_sent, "rollout/tokens_per_s": tokens / gen_s,
                                   "rollout/reward_mean": float(np.mean(rewards_all)),
                                   **{f"rollout/{k}": v for k, v in self.counters.items()}})

    def run(self) -> None:
        self._send(Hello(server_id=self.server_id, host=socket.gethostname(), pid=os.getpid(),
                         engine=self.cfg.rollout.engine.type))
        try:
            while True:
                self.poll_announcements()
                self.sync_weights()
                self.heartbeat()
                self.generate_groups()
        except Stop:
            log.info("%s stopping after %d groups", self.server_id, self.groups_sent)
        finally:
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
