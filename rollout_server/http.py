"""An OpenAI-compatible HTTP endpoint on a rollout server (``rollout.http_port``; docs/TASKS.md, "Driving
episodes over HTTP (OpenAI API)").

Served by aiohttp on the rollout server's own asyncio loop (uvloop): one event loop per process. Every
engine call goes to the server's one worker thread, between its own engine calls, so HTTP and the
server's generation share the engine and its weights version; each response names that version
(``X-Podsrl-Version`` and ``system_fingerprint: podsrl-v<version>``). Routes::

    GET  /v1/models                          the one model (its id: model.path's last part, or "podsrl")
    POST /v1/completions                     non-streaming; prompt: a string or token ids
    POST /v1/chat/completions                non-streaming; the model's chat template (plain text without one)
    POST /podsrl/v1/episodes/{id}/reward     {"reward": r}: the episode's reward; a complete group is pushed
    DELETE /podsrl/v1/episodes/{id}          abandon the episode's group (counted)
    GET  /podsrl/v1/metrics                  the endpoint's counters (also in rollout-<id>.jsonl)

A request with the header ``X-Podsrl-Episode: new`` opens a group of ``n`` episodes (their ids in
``podsrl.episodes`` and the ``X-Podsrl-Episodes`` header); ``X-Podsrl-Episode: <id>`` continues one
(``rollout_server/http_episodes.py``). With ``rollout.http_tokens_file`` every request needs
``Authorization: Bearer <token>`` (401 otherwise); each token is a client (its open episodes are its own).
Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``), counted by status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from protocol.config import Config
from rollout_server.http_episodes import BookError, EpisodeBook, Limits, stitch
from rollout_server.openai_api import ApiError, Choice, Request, finish_reason, parse, response
from rollout_server.openai_api import Limits as ApiLimits
from rollout_server.sampling import Engine, SamplingSpec

log = logging.getLogger("podsrl.http")
EPISODE_HEADER, EPISODES_HEADER, VERSION_HEADER = "X-Podsrl-Episode", "X-Podsrl-Episodes", "X-Podsrl-Version"
BYTES_PER_TOKEN = 32  # a request body may hold this many bytes per token a prompt may have, plus 64 KiB


class Host(Protocol):
    """What the endpoint uses of its rollout server."""

    engine: Engine
    task: Any  # rollout_server.tasks.Task, None before the first weights
    env_counters: Counter[str]

    async def in_worker(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    async def push_episodes(self, part: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Sampled:
    prompt_ids: np.ndarray
    env_ids: np.ndarray  # continuing an episode: the prompt's tokens after the episode's
    choices: list[Choice]
    version: int
    seconds: float


def model_id(cfg: Config) -> str:
    return Path(cfg.model.path).name if cfg.model.path else "podsrl"


def read_tokens(path: str) -> dict[str, str]:
    """token -> client name (``token-<line>``), from a file of one token a line (``#`` comments)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(
            f"rollout.http_tokens_file={path!r} cannot be read ({e}): write one bearer token a line"
        ) from None
    tokens = {t.strip(): f"token-{i + 1}" for i, t in enumerate(lines) if t.strip() and not t.startswith("#")}
    if not tokens:
        raise ValueError(f"rollout.http_tokens_file={path!r} holds no token: write one bearer token a line")
    return tokens


class HttpEndpoint:
    def __init__(self, cfg: Config, host: Host, monitor: Any, seed: int) -> None:
        self.cfg, self.host, self.monitor = cfg, host, monitor
        self.rng = np.random.default_rng(seed)
        rc = cfg.rollout
        self.tokens = read_tokens(rc.http_tokens_file) if rc.http_tokens_file else None
        context = cfg.task.max_prompt_tokens + cfg.max_completion_tokens
        self.limits = ApiLimits(model_id(cfg), cfg.max_new_tokens, cfg.max_group_size, context)
        self.book = EpisodeBook(
            Limits(
                max_open=rc.http_max_open_episodes,
                max_turns=cfg.max_turns,
                max_tokens=cfg.max_completion_tokens,
                max_prompt_tokens=cfg.task.max_prompt_tokens,
                timeout_s=rc.http_episode_timeout_s,
                max_abs_reward=cfg.selector.max_abs_reward,
                min_n=rc.group_size,
                max_n=cfg.max_group_size,
            ),
            host.env_counters,
        )
        self.max_body = BYTES_PER_TOKEN * context + (64 << 10)
        self.counters: Counter[str] = Counter()
        self.seconds: dict[str, float] = {
            "requests": 0.0,
            "engine": 0.0,
        }  # of the answered generation requests: in all, and in the engine
        self.runner: web.AppRunner | None = None
        self.port = 0

    # -- serving -----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=self.max_body)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/podsrl/v1/episodes/{episode}/reward", self._reward)
        app.router.add_delete("/podsrl/v1/episodes/{episode}", self._abandon)
        app.router.add_get("/podsrl/v1/metrics", self._metrics)
        return app

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        host, port = self.cfg.rollout.http_host, self.cfg.rollout.http_port
        try:
            await web.TCPSite(self.runner, host, port).start()
        except OSError as e:
            raise RuntimeError(
                f"the HTTP endpoint cannot listen on {host}:{port} ({e}): set rollout.http_port to a free port "
                "(each rollout server on a machine needs its own)"
            ) from None
        self.port = self.cfg.rollout.http_port
        auth = "bearer tokens" if self.tokens else "no authentication"
        log.info("OpenAI-compatible endpoint on http://%s:%d/v1 (%s)", self.cfg.rollout.http_host, self.port, auth)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def sweep_forever(self) -> None:
        """Drop idle episode groups, and write the endpoint's metrics when they changed."""
        every = min(5.0, self.cfg.rollout.http_episode_timeout_s / 4)
        last: dict[str, float] = {}
        while True:
            await asyncio.sleep(every)
            self.book.sweep()
            now = self.metrics()
            if now != last:
                self.monitor.log(self.host.engine.version or 0, now)
                last = now

    def metrics(self) -> dict[str, float]:
        return {
            **{f"http/{k}": float(v) for k, v in self.counters.items()},
            **self.book.metrics(),
            **{f"time/http_{k}": v for k, v in self.seconds.items()},
            "env/errors/prefix_mismatch": float(self.host.env_counters["errors/prefix_mismatch"]),
        }

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Any:
        """Authentication, and every failure as OpenAI's JSON error (the server goes on serving)."""
        self.counters["requests"] += 1
        try:
            request["client"] = self._client(request)
            return await handler(request)
        except ApiError as e:
            err = e
        except BookError as e:
            err = ApiError(e.status, e.message, None, e.code)
        except web.HTTPException as e:
            size = f" (at most {self.max_body} bytes: shorten the prompt)" if e.status == 413 else ""
            err = ApiError(e.status, f"{e.reason}: {request.method} {request.path[:100]}{size}", None, None)
        except Exception as e:  # a bug here must not take the rollout server down
            log.exception("HTTP %s %s failed", request.method, request.path[:100])
            err = ApiError(500, f"the rollout server failed this request ({type(e).__name__}); see its log")
        self.counters[f"errors/{err.status}"] += 1
        return web.json_response(err.body(), status=err.status, headers=self._headers())

    def _client(self, request: web.Request) -> str:
        if self.tokens is None:
            return "local"
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        for known, name in self.tokens.items():  # compare every token, in constant time each
            if scheme == "Bearer" and hmac.compare_digest(token.strip().encode(), known.encode()):
                return name
        raise ApiError(
            401,
            "Incorrect API key provided: send 'Authorization: Bearer <token>' with a token of rollout.http_tokens_file "
            "(the openai client's api_key)",
            None,
            "invalid_api_key",
        )

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        version = self.host.engine.version
        return {VERSION_HEADER: str(-1 if version is None else version), **(extra or {})}

    # -- routes ----------------------------------------------------------------------------------
    def _card(self) -> dict[str, Any]:
        version = self.host.engine.version
        return {
            "id": self.limits.model,
            "object": "model",
            "created": 0,
            "owned_by": "podsrl",
            "podsrl_version": version,
        }

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]}, headers=self._headers())

    async def _model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.limits.model:
            raise ApiError(404, f"The model {request.match_info['model'][:80]!r} does not exist", "model")
        return web.json_response(self._card(), headers=self._headers())

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.json_response(self.metrics(), headers=self._headers())

    async def _completions(self, request: web.Request) -> web.Response:
        return await self._timed(request, "completions")

    async def _chat(self, request: web.Request) -> web.Response:
        return await self._timed(request, "chat")

    async def _timed(self, request: web.Request, kind: str) -> web.Response:
        """A generation request, its time (body read to response built) added to ``time/http_requests``."""
        t0 = time.monotonic()
        out = await self._generate(request, kind)
        self.seconds["requests"] += time.monotonic() - t0
        return out

    async def _reward(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if not isinstance(body, dict) or set(body) != {"reward"}:
            raise ApiError(400, 'the body is {"reward": <number>}', "reward", "invalid_request")
        eid = request.match_info["episode"]
        part = self.book.reward(eid, request["client"], body["reward"])
        if part is not None:
            await self.host.push_episodes(part)
            self.monitor.log(int(part["version"]), self.metrics())
        return web.json_response({"episode": eid, "group_pushed": part is not None}, headers=self._headers())

    async def _abandon(self, request: web.Request) -> web.Response:
        eid = request.match_info["episode"]
        self.book.drop(eid, request["client"], "abandoned")
        return web.json_response({"episode": eid, "dropped": True}, headers=self._headers())

    async def _generate(self, request: web.Request, kind: str) -> web.Response:
        req = parse(await _json(request), kind, self.limits)
        if self.host.task is None or self.host.engine.version is None:
            raise ApiError(503, "the rollout server has no weights yet: retry in a few seconds", None, "not_ready")
        client, episode = request["client"], request.headers.get(EPISODE_HEADER)
        seed = req.seed if req.seed is not None else int(self.rng.integers(2**62))
        if episode is None:
            sampled = await self.host.in_worker(self._sample, req, self.limits.max_context_tokens, None, 0, seed)
            return self._respond(req, sampled, {})
        if req.temperature != self.cfg.rollout.temperature:
            raise ApiError(
                400,
                f"an episode is sampled at rollout.temperature={self.cfg.rollout.temperature} (the learner's log-probs "
                f"are of that distribution), got temperature={req.temperature}: leave it out",
                "temperature",
            )
        if episode == "new":
            self.book.check_open(client, req.n, 0)
            sampled = await self.host.in_worker(self._sample, req, self.cfg.task.max_prompt_tokens, None, 0, seed)
            self.book.check_open(client, req.n, len(sampled.prompt_ids))  # others may have opened meanwhile
            ids = self.book.open(
                client,
                sampled.prompt_ids,
                [c.ids for c in sampled.choices],
                [c.logprobs for c in sampled.choices],
                sampled.version,
                sampled.seconds,
            )
            return self._respond(req, sampled, {"episodes": ids}, {EPISODES_HEADER: ",".join(ids)})
        if req.n != 1:
            raise ApiError(400, f"a turn of an episode has n=1, got n={req.n}", "n")
        context, room = self.book.begin(episode, client)
        try:
            sampled = await self.host.in_worker(self._sample, req, 0, context, room, seed)
            if sampled is None:
                self.book.drop(episode, client, "prefix_mismatch")
                raise ApiError(
                    422,
                    f"the prompt of episode {episode} does not start with the episode's tokens so far (its first "
                    "prompt and every turn, as sampled): the text was re-templated or edited. Send the conversation "
                    "back as it was answered, with new messages after it only. The episode's group is dropped "
                    "(env/errors/prefix_mismatch)",
                    None,
                    "prefix_mismatch",
                )
            c = sampled.choices[0]
            self.book.add_turn(episode, client, sampled.env_ids, c.ids, c.logprobs, sampled.version, sampled.seconds)
        finally:
            self.book.end_turn(episode, client)
        return self._respond(req, sampled, {"episodes": [episode]})

    def _respond(
        self, req: Request, s: Sampled, extra: dict[str, Any], headers: dict[str, str] | None = None
    ) -> web.Response:
        self.seconds["engine"] += s.seconds
        body = response(req, self.limits.model, s.version, s.prompt_ids, s.choices, extra)
        return web.json_response(body, headers={**self._headers(headers), VERSION_HEADER: str(s.version)})

    # -- the worker thread -------------------------------------------------------------------------
    def _sample(self, req: Request, cap: int, context: np.ndarray | None, room: int, seed: int) -> Sampled | None:
        """(worker) Tokenize the prompt, check it (its length; continuing an episode, that it starts with the
        episode's tokens: None when not), sample. The engine's version is read here, where weights load."""
        task, engine = self.host.task, self.host.engine
        prompt_ids = self._tokenize(req, task.tokenizer)
        env_ids = np.empty(0, np.int32)
        max_tokens = req.max_tokens
        if context is None:
            if len(prompt_ids) > cap:
                raise ApiError(
                    400,
                    f"the prompt has {len(prompt_ids)} tokens > {cap} (task.max_prompt_tokens for an episode's first "
                    "prompt, plus max_completion_tokens otherwise): shorten it",
                    "messages" if req.kind == "chat" else "prompt",
                    "context_length_exceeded",
                )
        else:
            found = stitch(context, prompt_ids)
            if found is None:
                return None
            env_ids, room = found, room - len(found)
            if room < 1:
                raise ApiError(
                    400,
                    f"the episode has no room for another turn (max_completion_tokens={self.cfg.max_completion_tokens} "
                    "tokens after its first prompt): send its reward",
                    None,
                    "context_length_exceeded",
                )
            max_tokens = min(max_tokens, room)
        spec = SamplingSpec(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            stop_ids=task.stop_ids,
            pad_id=task.pad_id,
            stop_strings=req.stop,
            decode=task.tokenizer.decode if req.stop else None,
        )
        t0 = time.monotonic()
        samples = engine.generate([prompt_ids], req.n, spec, seed)
        seconds, version = time.monotonic() - t0, engine.version
        assert version is not None
        chat_template = req.kind == "chat" and getattr(task.tokenizer, "chat_template", None) is not None
        choices = [
            self._choice(req, ids, lps, task, max_tokens, chat_template)
            for ids, lps in zip(samples.ids, samples.logprobs, strict=True)
        ]
        return Sampled(prompt_ids, env_ids, choices, version, seconds)

    def _tokenize(self, req: Request, tokenizer: Any) -> np.ndarray:
        if req.kind == "completions":
            if isinstance(req.prompt, list):
                if max(req.prompt) >= len(tokenizer) or min(req.prompt) < 0:
                    raise ApiError(400, f"'prompt' holds token ids outside 0..{len(tokenizer) - 1}", "prompt")
                return np.asarray(req.prompt, np.int32)
            return np.asarray(tokenizer(req.prompt, add_special_tokens=True)["input_ids"], np.int32)
        assert req.messages is not None
        if getattr(tokenizer, "chat_template", None) is None:  # plain text: the messages' contents in order
            if req.tools:
                raise ApiError(400, "'tools' needs a chat template, and this model's tokenizer has none", "tools")
            text = "".join(m["content"] for m in req.messages)
            return np.asarray(tokenizer(text, add_special_tokens=True)["input_ids"], np.int32)
        try:
            text = tokenizer.apply_chat_template(
                req.messages, tools=req.tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a template that raises on these messages (jinja's own errors are of many types)
            raise ApiError(
                400, f"the model's chat template refused these messages: {str(e)[:200]}", "messages"
            ) from None
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)

    def _choice(self, req: Request, ids: np.ndarray, lps: np.ndarray, task: Any, max_tokens: int, chat: bool) -> Choice:
        """A sampled turn as OpenAI's choice. Its text is its tokens decoded with special tokens kept, so that
        the text sent back reproduces the tokens; in a chat with a template, without the final stop token,
        which the template writes itself after an assistant message."""
        tok = task.tokenizer
        shown = ids[:-1] if chat and len(ids) and int(ids[-1]) in task.stop_ids else ids
        text = tok.decode(shown.tolist(), skip_special_tokens=False)
        tokens = [tok.decode([int(t)], skip_special_tokens=False) for t in ids] if req.logprobs else []
        return Choice(text, ids, lps, tokens, finish_reason(ids, max_tokens, task.stop_ids))


async def _json(request: web.Request) -> Any:
    raw = await request.read()  # bounded by client_max_size (413 beyond)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request: send a JSON object (Content-Type: application/json)",
            None,
            "invalid_json",
        ) from None
