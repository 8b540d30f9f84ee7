"""The small countdown task's reward, written as a user's own plug-in would be.

``countdown_shape`` scores a bare expression such as ``3*5+7`` against the row's ``numbers`` and
``target``: 0.4 x how well its integer literals match the numbers (the size of the multiset
intersection over the larger of the two counts), plus, when it parses and uses each number exactly
once, 0.6 x how close its value is (1 - |value - target| / 10, at least 0). An exact hit scores 1.0 and
nothing else does. Expressions are parsed by the built-in countdown verifier's shunting-yard parser
(``rollout_server.tasks.verifiers.evaluate_expression``: integers, ``+ - * / ( )``, bounded, never
``eval``), so hostile text scores 0 in microseconds. Use it as
``task.reward = "examples/countdown3/countdown3_rewards.py:countdown_shape"``.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from typing import Any

from rollout_server.tasks.verifiers import MAX_EXPR_CHARS, ExpressionError, evaluate_expression

NUMBERS_WEIGHT, VALUE_WEIGHT, VALUE_SCALE = 0.4, 0.6, 10


def score(text: str, numbers: list[int], target: int) -> float:
    expr = text.strip()
    if len(expr) > MAX_EXPR_CHARS:
        return 0.0
    literals = [int(d) for d in re.findall(r"[0-9]{1,6}", expr)]
    want = Counter(int(n) for n in numbers)
    shared = sum((Counter(literals) & want).values())
    reward = NUMBERS_WEIGHT * shared / max(len(literals), sum(want.values()))
    try:
        value, used = evaluate_expression(expr)
    except ExpressionError:
        return reward
    if Counter(used) == want:
        reward += VALUE_WEIGHT * max(0.0, 1 - float(abs(value - Fraction(target))) / VALUE_SCALE)
    return reward


def countdown_shape(
    prompts: list[Any], completions: list[str], numbers: list[list[int]], target: list[int], **_: Any
) -> list[float | None]:
    return [score(c, n, t) for c, n, t in zip(completions, numbers, target, strict=True)]
