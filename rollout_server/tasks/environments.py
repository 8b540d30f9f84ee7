"""Environments: what answers the model between its turns of a multi-turn episode (docs/TASKS.md).

An environment is a class; the rollout server makes one for each call, in the reward worker (the same
killable process, with ``task.env_timeout_s``), and calls::

    reset(row) -> messages                              # the episode's opening messages, from the dataset row
    step(messages) -> (new_messages | None, reward)     # messages: the whole conversation so far

``messages`` are chat messages ``{"role": ..., "content": ...}``: ``reset``'s, then the model's turns
(``assistant``) and the environment's (any other role) in order. The model's prompt is the task's
rendering of the row, as for single-turn tasks (``task.template``, the chat template); ``reset``'s
messages open the conversation that ``step`` sees. ``step`` answers the model's last
turn: new messages continue the episode (their text, tokenized, follows the model's tokens with loss
mask 0), ``None`` ends it. The reward that comes with ``None`` is the episode's; ``None`` as the
reward leaves the scoring to the task's reward functions, on the model's last turn. An environment
holds no state between calls (each call makes a fresh one and replays ``reset``): all state is the
conversation, so a killed worker loses nothing but the call in flight.

Tools are plain Python functions, given to :class:`ToolEnv`. The model calls one by writing
``<tool>name(arguments)</tool>`` (``<tool>arguments</tool>`` when the environment has exactly one tool);
its turn ends there, the function runs on the argument text and the environment answers
``<result>...</result>``. A turn without a tool call ends the episode. ``calc`` (:class:`CalcEnv`)
is the built-in: one tool that multiplies, adds and subtracts integers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from rollout_server.tasks.data import TaskError
from rollout_server.tasks.plugins import load_plugin

Messages = list[dict[str, str]]
TOOL_OPEN, TOOL_CLOSE, RESULT_OPEN, RESULT_CLOSE = "<tool>", "</tool>", "<result>", "</result>"
TOOL_TAGS = (TOOL_OPEN, TOOL_CLOSE, RESULT_OPEN, RESULT_CLOSE)  # whole tokens of the tiny model's tokenizer
MAX_CALL_CHARS = 1000  # a tool call's text beyond this is not parsed (the call is an error)
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]{0,63})\((.*)\)", re.DOTALL)


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> Messages: ...

    def step(self, messages: Messages) -> tuple[Messages | None, float | None]: ...


def parse_tool_call(text: str, tools: Mapping[str, Callable[[str], Any]]) -> tuple[str, str] | None:
    """``(tool name, argument text)`` of the last ``<tool>...</tool>`` of a turn, None when there is none.

    ``<tool>name(arguments)</tool>`` names a tool; with exactly one tool, ``<tool>arguments</tool>`` calls
    it. An unknown name is returned as it is (the caller answers it)."""
    end = text.rfind(TOOL_CLOSE)
    start = text.rfind(TOOL_OPEN, 0, end) if end >= 0 else -1
    if start < 0:
        return None
    body = text[start + len(TOOL_OPEN) : end]
    if len(body) > MAX_CALL_CHARS:
        return ("", "")
    named = _CALL.fullmatch(body.strip())
    if named is not None and (named.group(1) in tools or len(tools) != 1):
        return named.group(1), named.group(2)
    if len(tools) == 1:
        return next(iter(tools)), body.strip()
    return ("", body)


class ToolEnv:
    """Tools as plain functions ``f(argument_text) -> result`` (its ``str`` is the answer). A turn with a tool
    call is answered ``<result>{result}</result>`` (an unknown tool or a tool error too, counted in
    ``tool_errors``); a turn without one ends the episode, scored by the task's reward functions. A tool that
    raises is an error of the environment: the episode ends with reward 0, counted (``env/errors/raised``)."""

    tools: dict[str, Callable[[str], Any]] = {}

    def __init__(self) -> None:
        self.row: dict[str, Any] = {}
        self.tool_calls = 0
        self.tool_errors: Counter[str] = Counter()

    def reset(self, row: dict[str, Any]) -> Messages:
        self.row = row
        return [{"role": "user", "content": str(row.get("prompt", ""))}]

    def step(self, messages: Messages) -> tuple[Messages | None, float | None]:
        call = parse_tool_call(messages[-1]["content"], self.tools)
        if call is None:
            return None, None
        self.tool_calls += 1
        name, argument = call
        if name not in self.tools:
            self.tool_errors["unknown_tool" if name else "bad_call"] += 1
            return [{"role": "tool", "content": f"{RESULT_OPEN}error{RESULT_CLOSE}"}], None
        result = self.tools[name](argument)
        if result is None:
            self.tool_errors["no_result"] += 1
        return [{"role": "tool", "content": f"{RESULT_OPEN}{'' if result is None else result}{RESULT_CLOSE}"}], None


_EXPR = re.compile(r"\s*([0-9]{1,18})\s*([*+-])\s*([0-9]{1,18})\s*=?\s*")


def calc(expression: str) -> str | None:
    """``a*b``, ``a+b`` or ``a-b`` of two integers of at most 18 digits, a trailing ``=`` allowed (never
    ``eval``); None when the text is not one of those (the environment answers it as an error)."""
    m = _EXPR.fullmatch(expression)
    if m is None:
        return None
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a * b if op == "*" else a + b if op == "+" else a - b)


class CalcEnv(ToolEnv):
    """The built-in tool environment (``task.environment = "calc"``): one tool, ``calc``."""

    tools = {"calc": calc}


def _in_place(text: str, target: str) -> float:
    """The fraction of ``target``'s characters that ``text`` has in place (the ``copy`` reward)."""
    return sum(a == b for a, b in zip(target, text, strict=False)) / len(target) if target else 0.0


class CalcShapedEnv(CalcEnv):
    """``calc`` with credit for the call (``task.environment = "calc_shaped"``, for the ``product`` task): with
    ``c`` the best call's characters in place against the question's expression (``123*456``) and ``a`` the
    answer's digits in place, the episode's reward is ``c x (0.5 + 0.5 a)``: a model starting from nothing is
    paid for coming closer to the right call, and guessing without one pays nothing (a shaped reward:
    ``eval/pass@1`` counts the episodes that made the right call and answered right)."""

    def step(self, messages: Messages) -> tuple[Messages | None, float | None]:
        new, _ = super().step(messages)
        if new is not None:
            return new, None
        question = str(self.row.get("prompt", "")).rstrip("=")
        calls = [
            found[1]
            for m in messages
            if m["role"] == "assistant" and (found := parse_tool_call(m["content"], self.tools)) is not None
        ]
        c = max((_in_place(argument, question) for argument in calls), default=0.0)
        return None, c * (0.5 + 0.5 * _in_place(messages[-1]["content"], str(self.row.get("answer", ""))))


BUILTIN_ENVIRONMENTS: dict[str, Callable[[], Environment]] = {"calc": CalcEnv, "calc_shaped": CalcShapedEnv}


def load_environment(spec: str) -> Callable[[], Environment]:
    """Resolve ``task.environment`` to a class (or factory) of environments, or raise TaskError naming the fix."""
    env = load_plugin("task.environment", spec, BUILTIN_ENVIRONMENTS, "Class")
    if not callable(env) or not all(callable(getattr(env, m, None)) for m in ("reset", "step")):
        raise TaskError(f"task.environment={spec!r} is not a class with reset(row) and step(messages)")
    return cast(Callable[[], Environment], env)


def _messages(value: Any, max_chars: int) -> Messages | str:
    """``value`` as a list of ``{"role", "content"}`` strings within ``max_chars`` characters, or an error reason."""
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return "bad_output"
    if sum(len(m["content"]) + len(m["role"]) for m in value) > max_chars:
        return "too_long"
    return [{"role": m["role"], "content": m["content"]} for m in value]


def env_call(factory: Callable[[], Environment], row: dict[str, Any], turns: Messages, max_chars: int) -> Any:
    """One step, in the worker: a fresh environment, ``reset(row)``, then ``step(reset's messages + turns)``
    (``turns``: the episode's messages since, the model's last). Returns ``("ok", (messages | None, reward |
    None, tool_calls, tool_errors))`` or ``(reason, detail)``, reason one of ``raised``, ``bad_output``,
    ``too_long``, ``bad_reward``. Exceptions of the environment are caught here; a hang is the caller's to cut."""
    try:
        env = factory()
        opening = _messages(env.reset(row), 1 << 62)
        if isinstance(opening, str):
            return opening, "reset() must return a list of {'role': str, 'content': str}"
        new, reward = env.step(opening + turns)
    except Exception as e:
        return "raised", f"{type(e).__name__}: {str(e)[:200]}"
    if reward is not None and (
        isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward)
    ):
        return "bad_reward", f"step() returned the reward {str(reward)[:80]}: a finite number or None expected"
    checked = None if new is None else _messages(new, max_chars)
    if isinstance(checked, str):
        what = f"over task.max_env_chars={max_chars}" if checked == "too_long" else "not [{'role', 'content'}]"
        return checked, f"step() returned new messages {what}"
    calls, errors = getattr(env, "tool_calls", 0), dict(getattr(env, "tool_errors", {}))
    return "ok", (checked, None if reward is None else float(reward), int(calls), errors)
