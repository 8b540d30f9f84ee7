"""The arithmetic example's shaping reward, written as a user's own plug-in would be.

``answer_shape`` gives partial credit on the way to GSM8K's final line ``#### <sum>``: half for the
``#### `` marker (per character in place), half for how close the number after it is to the sum.
A policy that starts from random text finds the format first and then the digits; the built-in
``math_answer`` pays the full reward only for the exact answer. Use it as
``task.reward = ["math_answer", "examples/arith/rewards.py:answer_shape"]``.
"""

from __future__ import annotations

from typing import Any

MARKER = "#### "


def answer_shape(prompts: list[Any], completions: list[str], answer: list[str], **kwargs: Any) -> list[float | None]:
    scores: list[float | None] = []
    for text, solution in zip(completions, answer, strict=True):
        target = int(solution.rpartition("####")[2])
        marker = sum(want == got for want, got in zip(MARKER, text, strict=False)) / len(MARKER)
        digits = text[len(MARKER) : len(MARKER) + 3].strip()
        close = max(0.0, 1 - abs(int(digits) - target) / 5) if digits.isdigit() else 0.0
        scores.append(0.5 * marker + 0.5 * close)
    return scores
