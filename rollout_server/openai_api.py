"""OpenAI request bodies in, response bodies out: pure functions, no sockets (``rollout_server/http.py`` serves them).

Requests are checked as OpenAI checks them: an unknown argument is ``400 Unrecognized request argument
supplied``; an argument the endpoint does not implement is refused unless it has its neutral value
(``top_p`` 1, penalties 0, ``stream`` false, ...); every size is bounded by the run's config
(``max_tokens`` by ``max_new_tokens``, ``n`` by the largest group size, ``stop`` by 4 strings of 64
characters). Errors are :class:`ApiError` and become ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_STOP, MAX_STOP_CHARS, MAX_MESSAGES = 4, 64, 4096
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# arguments accepted only with their neutral value (None is neutral for each)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (False,),
    "top_p": (1, 1.0),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "best_of": (1,),
    "echo": (False,),
    "logit_bias": ({},),
    "suffix": ("",),
    "top_logprobs": (0,),
    "tool_choice": ("auto", "none"),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
    "stream_options": (),
}
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})  # bookkeeping arguments of OpenAI's own service
COMMON = frozenset({"model", "max_tokens", "temperature", "n", "logprobs", "stop", "seed", "return_token_ids"})
KNOWN = {
    "completions": COMMON | {"prompt"} | set(NEUTRAL) | IGNORED,
    "chat": COMMON | {"messages", "max_completion_tokens", "tools"} | set(NEUTRAL) | IGNORED,
}


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message (naming the fix), parameter and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(self.status)
        kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    model: str  # the id /v1/models lists
    max_new_tokens: int
    max_n: int
    max_context_tokens: int  # a prompt's tokens at most (task.max_prompt_tokens + max_completion_tokens)


@dataclass(frozen=True)
class Request:
    """A checked request. ``prompt`` is text or token ids (completions); ``messages`` a chat (chat)."""

    kind: str  # "completions" | "chat"
    max_tokens: int
    temperature: float
    n: int
    logprobs: bool
    stop: tuple[str, ...]
    seed: int | None
    token_ids: bool  # return_token_ids (vLLM's extension): each choice's sampled ids, and the prompt's
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[Any] | None = None


def _int(body: dict[str, Any], key: str, default: int, low: int, high: int, fix: str) -> int:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer, got {str(v)[:40]}", key, "invalid_type")
    if not low <= v <= high:
        raise ApiError(400, f"'{key}' must be in {low}..{high}, got {v}: {fix}", key, "invalid_value")
    return v


def parse(body: Any, kind: str, lim: Limits) -> Request:
    """A request body as a :class:`Request`, or :class:`ApiError` (400/404) naming what to change."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    for key in body:
        if key not in KNOWN[kind]:
            raise ApiError(400, f"Unrecognized request argument supplied: {str(key)[:64]}", str(key)[:64])
    for key, ok in NEUTRAL.items():
        if body.get(key) is not None and body[key] not in ok:
            what = "streaming is not implemented: set stream=false" if key == "stream" else "only its neutral value"
            raise ApiError(400, f"'{key}'={str(body[key])[:40]} is not supported by podsrl ({what})", key)
    if body.get("model") != lim.model:
        raise ApiError(
            404, f"The model {str(body.get('model'))[:80]!r} does not exist: this server serves {lim.model!r}", "model"
        )
    limit_fix = "lower it (rollout.max_new_tokens bounds a turn)"
    max_tokens = _int(body, "max_tokens", lim.max_new_tokens, 1, lim.max_new_tokens, limit_fix)
    if kind == "chat":
        max_tokens = _int(body, "max_completion_tokens", max_tokens, 1, lim.max_new_tokens, limit_fix)
    n = _int(body, "n", 1, 1, lim.max_n, "a group is at most this large (rollout.group_size, rollout.max_group_size)")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be a number in 0..2, got {str(temperature)[:40]}", "temperature")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' is a string or up to {MAX_STOP} strings of 1..{MAX_STOP_CHARS} characters", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62):
        raise ApiError(400, "'seed' must be an integer in 0..2**62", "seed")
    logprobs = body.get("logprobs")
    if kind == "completions":
        if logprobs is not None and (isinstance(logprobs, bool) or logprobs not in (0, 1)):
            raise ApiError(400, "'logprobs' must be 0 or 1: only the sampled token's log-prob is returned", "logprobs")
    elif logprobs is not None and not isinstance(logprobs, bool):
        raise ApiError(400, "'logprobs' must be true or false", "logprobs")
    common: dict[str, Any] = {
        "kind": kind,
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "n": n,
        "logprobs": bool(logprobs),
        "stop": stops,
        "seed": seed,
        "token_ids": bool(body.get("return_token_ids")),
    }
    if kind == "completions":
        return Request(**common, prompt=_prompt(body.get("prompt"), lim))
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", "tools")
    return Request(**common, messages=_messages(body.get("messages")), tools=tools or None)


def _prompt(p: Any, lim: Limits) -> str | list[int]:
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one prompt
    if isinstance(p, str):
        if not p:
            raise ApiError(400, "'prompt' is empty", "prompt")
        return p
    if isinstance(p, list) and p and all(type(t) is int for t in p):
        if len(p) > lim.max_context_tokens:
            raise ApiError(400, f"'prompt' has {len(p)} tokens > {lim.max_context_tokens}", "prompt")
        return list(p)
    raise ApiError(
        400, "'prompt' must be one string or one list of token ids (send several prompts as several requests)", "prompt"
    )


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise ApiError(400, f"'messages' must be a list of 1..{MAX_MESSAGES} messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a 'role', one of {sorted(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # text parts
            if not all(
                isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content
            ):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(c["text"] for c in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or text parts", f"messages[{i}].content")
        out.append({**m, "content": content})
    return out


def finish_reason(ids: np.ndarray, max_tokens: int, stop_ids: tuple[int, ...]) -> str:
    """'stop' after a stop token or a stop string, 'length' at max_tokens (also when a stop string ends there)."""
    return "stop" if len(ids) < max_tokens or (len(ids) and int(ids[-1]) in stop_ids) else "length"


def _logprobs(kind: str, tokens: list[str], lps: np.ndarray) -> dict[str, Any]:
    values = [float(x) for x in lps]
    if kind == "completions":
        offsets = np.cumsum([0, *(len(t) for t in tokens[:-1])]).tolist() if tokens else []
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": None, "text_offset": offsets}
    return {
        "content": [
            {"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
            for t, v in zip(tokens, values, strict=True)
        ]
    }


@dataclass(frozen=True)
class Choice:
    text: str
    ids: np.ndarray
    logprobs: np.ndarray
    tokens: list[str]  # each sampled token as text
    finish: str


def response(
    req: Request, model: str, version: int, prompt_ids: np.ndarray, choices: list[Choice], extra: dict[str, Any]
) -> dict[str, Any]:
    """The response body: OpenAI's fields, ``system_fingerprint`` = ``podsrl-v<weights version>``, and
    ``podsrl`` (the version, and the episode ids when the request opened episodes)."""
    out_choices = []
    for i, c in enumerate(choices):
        one: dict[str, Any] = {"index": i, "finish_reason": c.finish}
        if req.kind == "completions":
            one["text"] = c.text
        else:
            one["message"] = {"role": "assistant", "content": c.text}
        one["logprobs"] = _logprobs(req.kind, c.tokens, c.logprobs) if req.logprobs else None
        if req.token_ids:
            one["token_ids"] = c.ids.tolist()
        out_choices.append(one)
    completion = sum(len(c.ids) for c in choices)
    body: dict[str, Any] = {
        "id": f"{'cmpl' if req.kind == 'completions' else 'chatcmpl'}-{os.urandom(12).hex()}",
        "object": "text_completion" if req.kind == "completions" else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"podsrl-v{version}",
        "choices": out_choices,
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion,
        },
        "podsrl": {"version": version, **extra},
    }
    if req.token_ids:
        body["prompt_token_ids"] = prompt_ids.tolist()
    return body
