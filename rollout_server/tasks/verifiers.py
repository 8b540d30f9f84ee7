"""Built-in reward functions ("verifiers") for RL on text tasks: standard library only, safe on hostile text.

``BUILTIN_REWARDS`` is the registry of the names ``task.reward`` accepts besides a
``package.module:function`` or ``path/file.py:function`` (docs/TASKS.md lists them; a test checks).

Every reward follows TRL's batched reward-function convention::

    def reward(prompts: list, completions: list[str], **columns: list) -> list[float | None]

``columns`` are the dataset's other columns, one value per completion; unknown keyword arguments
(``completion_ids``, ``trainer_state``, ...) are accepted and ignored. Writing your own::

    from rollout_server.tasks.verifiers import BUILTIN_REWARDS, extract_final_answer

    def polite(prompts: list, completions: list[str], **_: list) -> list[float]:
        return [1.0 if "please" in c.lower() else 0.0 for c in completions]

    def short_answer(prompts: list, completions: list[str], max_chars: list[int], **_: list) -> list[float]:
        found = [extract_final_answer(c) for c in completions]
        return [float(a is not None and len(a) <= m) for a, m in zip(found, max_chars, strict=True)]

    rewards = {**BUILTIN_REWARDS, "polite": polite, "short_answer": short_answer}

Nothing here evaluates completion text as code; every scan is linear time and every number is size-capped
before it is built. The built-in rewards return floats in [0, 1], never None.
"""

from __future__ import annotations

import math
import operator
import re
import unicodedata
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any

RewardFn = Callable[..., Sequence[float | None]]  # f(prompts, completions, **columns), TRL's convention
Column = Sequence[Any]  # one dataset column: a value per completion

MAX_ANSWER_CHARS = 200  # extracted final answers longer than this never match
MAX_NUMBER_DIGITS = 100  # answers with more digits than this never match (no huge ints are built)
MAX_EXPR_CHARS, MAX_EXPR_TOKENS, MAX_EXPR_DEPTH, MAX_LITERAL_DIGITS = 200, 64, 32, 6
MAX_REGEX_CHARS = 10_000  # longer completions score 0.0 without running the pattern
COUNTDOWN_FORMAT_SCORE = 0.1  # a well-formed expression over the right numbers with the wrong value


# ---------------------------------------------------------------- math answers

_NUM = r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_PLAIN = re.compile(rf"([+-]?)\s*({_NUM})(?:\s*/\s*({_NUM}))?(.*)", re.DOTALL)
_LATEX_FRAC = re.compile(r"([+-]?)\s*\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}(.*)", re.DOTALL)
_SIGNED = re.compile(rf"\s*([+-]?)\s*({_NUM})\s*")
_REWRITES = (("\u2212", "-"), ("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\$", ""), ("$", ""))
_UNIT_STARTS = ("%", "\\%", "°", "^\\circ", "^{\\circ}", "\\circ", "\\text", "\\mbox", "\\mathrm", "\\ ")
_UNIT_POWERS = ("^2", "^3", "^{2}", "^{3}", "²", "³")


def _digit_count(text: str) -> int:
    return sum(c.isdecimal() for c in text)


def _ascii_digits(text: str) -> str:
    """Any Unicode decimal digit (Arabic-Indic, fullwidth, ...) as its ASCII digit."""
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() and not c.isascii() else c for c in text)


def _is_unit_tail(tail: str) -> bool:
    """Whether text after a number is only a unit or word (``dollars``, ``%``, ``\\text{ cm}^2``)."""
    t = tail.strip()
    if t and not (t[0].isalpha() or t.startswith(_UNIT_STARTS)):
        return False
    for power in _UNIT_POWERS:
        t = t.replace(power, "")
    return not any(c.isdigit() for c in t)


def _signed_fraction(sign: str, digits: str) -> Fraction:
    value = Fraction(digits.replace(",", ""))  # ASCII digits only, at most MAX_NUMBER_DIGITS of them
    return -value if sign == "-" else value


def normalize_number(text: str) -> str | None:
    """Canonical exact rational (``"3"``, ``"-1/2"``) of a numeric answer, or None if it is not one.

    Accepts ``$``, a trailing ``.``, thousands separators (``1,234``, ``1{,}234``), a leading ``+``, a unit
    or word after the number (``72 dollars``, ``5 cm``, ``50%`` -> 50), decimals (``3.0`` == ``3``), ``a/b``
    and ``\\frac{a}{b}`` / ``\\dfrac`` / ``\\tfrac``. Unicode decimal digits (Arabic-Indic, fullwidth, ...)
    are read as their ASCII digits and U+2212 MINUS SIGN as ``-``. No scientific notation. Text longer than
    MAX_ANSWER_CHARS or with more than MAX_NUMBER_DIGITS digits gives None.
    """
    if len(text) > MAX_ANSWER_CHARS or _digit_count(text) > MAX_NUMBER_DIGITS:
        return None
    s = _ascii_digits(text)
    for old, new in _REWRITES:
        s = s.replace(old, new)
    s = s.strip().rstrip(".").rstrip()
    if latex := _LATEX_FRAC.fullmatch(s):
        sign, num_text, den_text, tail = latex.groups()
        num, den = _SIGNED.fullmatch(num_text), _SIGNED.fullmatch(den_text)
        if num is None or den is None:
            return None
        numerator, denominator = _signed_fraction(*num.groups()), _signed_fraction(*den.groups())
    elif plain := _PLAIN.fullmatch(s):
        sign, num_digits, den_digits, tail = plain.groups()
        numerator = _signed_fraction("", num_digits)
        denominator = _signed_fraction("", den_digits) if den_digits else Fraction(1)
    else:
        return None
    if denominator == 0 or not _is_unit_tail(tail):
        return None
    value = numerator / denominator * (-1 if sign == "-" else 1)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _braced(text: str, start: int) -> str | None:
    """The text from ``start`` up to the brace closing an already-open ``{``; None if unclosed or too long."""
    depth = 1
    for i in range(start, min(len(text), start + MAX_ANSWER_CHARS + 1)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def extract_final_answer(text: str) -> str | None:
    """The last ``#### answer`` (to end of line) or last ``\\boxed{...}``, whichever starts later.

    None when there is neither marker, the answer is empty, or it is longer than MAX_ANSWER_CHARS.
    """
    hashes, boxed = text.rfind("####"), text.rfind("\\boxed{")
    if hashes < 0 and boxed < 0:
        return None
    if hashes > boxed:
        line_end = text.find("\n", hashes)
        answer: str | None = text[hashes + 4 : len(text) if line_end < 0 else line_end].strip()
    else:
        answer = _braced(text, boxed + len("\\boxed{"))
        answer = answer.strip() if answer is not None else None
    return answer if answer and len(answer) <= MAX_ANSWER_CHARS else None


def reference_answer(answer: object) -> str | None:
    """A dataset reference as answer text: ints and floats as decimals, strings with a marker extracted."""
    if isinstance(answer, int):
        return str(answer) if answer.bit_length() <= 4 * MAX_NUMBER_DIGITS else None  # else too many digits
    if isinstance(answer, float):
        return format(Decimal(repr(answer)), "f") if math.isfinite(answer) else None
    text = str(answer)
    if "####" in text or "\\boxed{" in text:
        return extract_final_answer(text)
    text = text.strip()
    return text if text and len(text) <= MAX_ANSWER_CHARS else None


def answers_match(predicted: str, reference: str) -> bool:
    """Exact rational equality if either side is numeric, else equality after collapsing whitespace."""
    if _digit_count(predicted) > MAX_NUMBER_DIGITS or _digit_count(reference) > MAX_NUMBER_DIGITS:
        return False
    predicted_number, reference_number = normalize_number(predicted), normalize_number(reference)
    if predicted_number is not None or reference_number is not None:
        return predicted_number == reference_number
    return " ".join(predicted.split()) == " ".join(reference.split())


def math_answer_score(completion: str, answer: object) -> float:
    """1.0 if the completion's final answer matches the reference ``answer``, else 0.0."""
    predicted, reference = extract_final_answer(completion), reference_answer(answer)
    return float(predicted is not None and reference is not None and answers_match(predicted, reference))


# ---------------------------------------------------------------- countdown


_TOKEN = re.compile(r"[0-9]+|\S")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_APPLY: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


class ExpressionError(ValueError):
    """A countdown expression that cannot be scored: bad syntax, over a limit, or division by zero."""


def _tokenize(text: str) -> list[str]:
    """ASCII integer literals and ``+ - * / ( )``, whitespace dropped; every limit checked."""
    if len(text) > MAX_EXPR_CHARS:
        raise ExpressionError("expression too long")
    tokens = _TOKEN.findall(text)  # digit runs, and every other non-space character alone
    depth = 0
    for token in tokens:
        if token[0] in "0123456789":
            if len(token) > MAX_LITERAL_DIGITS:
                raise ExpressionError("integer literal too long")
        elif token not in ("+", "-", "*", "/", "(", ")"):
            raise ExpressionError(f"unexpected character {token!r}")
        depth += (token == "(") - (token == ")")
        if depth > MAX_EXPR_DEPTH:
            raise ExpressionError("parentheses nested too deep")
    if len(tokens) > MAX_EXPR_TOKENS:
        raise ExpressionError("too many tokens")
    return tokens


def _reduce(values: list[Fraction], ops: list[str]) -> None:
    """Apply the operator on top of ``ops`` to the two values on top of ``values``."""
    op, rhs, lhs = ops.pop(), values.pop(), values.pop()
    if op == "/" and rhs == 0:
        raise ExpressionError("division by zero")
    values.append(_APPLY[op](lhs, rhs))


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of a countdown expression and its integer literals in order; raises ExpressionError.

    Shunting-yard over the tokens (no recursion), left-associative, ``* /`` binding tighter than ``+ -``.
    """
    values: list[Fraction] = []
    ops: list[str] = []
    literals: list[int] = []
    expect_operand = True
    for token in _tokenize(text):
        if expect_operand and token == "(":
            ops.append(token)
        elif expect_operand and token.isdigit():
            literals.append(int(token))
            values.append(Fraction(literals[-1]))
            expect_operand = False
        elif not expect_operand and token == ")":
            while ops and ops[-1] != "(":
                _reduce(values, ops)
            if not ops:
                raise ExpressionError("unbalanced ')'")
            ops.pop()
        elif not expect_operand and token in _PRECEDENCE:
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[token]:
                _reduce(values, ops)
            ops.append(token)
            expect_operand = True
        else:
            raise ExpressionError(f"unexpected {token!r}")
    if expect_operand or "(" in ops:
        raise ExpressionError("unexpected end of expression")
    while ops:
        _reduce(values, ops)
    return values[0], literals


def extract_countdown_answer(text: str) -> str:
    """The text inside the last complete ``<answer>...</answer>``, else the completion's last line."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        return text[start + len("<answer>") : end]
    stripped = text.rstrip()
    return stripped[stripped.rfind("\n") + 1 :]


def countdown_score(completion: str, numbers: Sequence[int], target: int | str | Fraction) -> float:
    """1.0 exact hit; COUNTDOWN_FORMAT_SCORE right numbers, wrong value; 0.0 otherwise.

    The expression must use each of ``numbers`` exactly once (multiset equality). Only ASCII digits are
    literals. No unary minus, no ``**``; division by zero or any exceeded limit scores 0.0.
    """
    try:
        value, literals = evaluate_expression(extract_countdown_answer(completion))
    except ExpressionError:
        return 0.0
    if sorted(literals) != sorted(int(n) for n in numbers):
        return 0.0
    return 1.0 if value == Fraction(target) else COUNTDOWN_FORMAT_SCORE


# ---------------------------------------------------------------- exact and regex


def exact_match_score(completion: str, answer: object) -> float:
    """1.0 if the stripped completion equals ``str(answer)`` stripped, else 0.0."""
    try:
        reference = str(answer)
    except ValueError:  # an int too large to print
        return 0.0
    return float(completion.strip() == reference.strip())


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def regex_match_score(completion: str, pattern: str) -> float:
    """1.0 if ``pattern`` fully matches the stripped completion; over MAX_REGEX_CHARS scores 0.0 unmatched."""
    if len(completion) > MAX_REGEX_CHARS:
        return 0.0
    return float(_compiled(pattern).fullmatch(completion.strip()) is not None)


# ---------------------------------------------------------------- batched rewards (TRL convention)


def char_match(prompts: Column, completions: list[str], answer: Column, **_: Any) -> list[float]:
    """copy / reverse: the fraction of the answer's characters the completion has in place."""
    return [
        sum(a == b for a, b in zip(ans, c, strict=False)) / len(ans) if ans else 0.0
        for c, ans in zip(completions, answer, strict=True)
    ]


def char_match_strict(prompts: Column, completions: list[str], answer: Column, **_: Any) -> list[float]:
    """copy / reverse with a length to learn: the characters in place over the longer of the answer and the
    completion, so characters after the answer cost (the variable-length task's model learns to stop)."""
    return [
        sum(a == b for a, b in zip(ans, c, strict=False)) / max(len(ans), len(c)) if ans else 0.0
        for c, ans in zip(completions, answer, strict=True)
    ]


def math_answer(prompts: Column, completions: list[str], answer: Column, **_: Any) -> list[float]:
    """Final ``#### x`` / ``\\boxed{x}`` answer equals the reference (see normalize_number): 1.0, else 0.0."""
    return [math_answer_score(c, a) for c, a in zip(completions, answer, strict=True)]


def countdown(prompts: Column, completions: list[str], numbers: Column, target: Column, **_: Any) -> list[float]:
    """The countdown game (TinyZero): see countdown_score."""
    return [countdown_score(c, n, t) for c, n, t in zip(completions, numbers, target, strict=True)]


def exact_match(prompts: Column, completions: list[str], answer: Column, **_: Any) -> list[float]:
    """Stripped completion equals the stripped reference: 1.0, else 0.0."""
    return [exact_match_score(c, a) for c, a in zip(completions, answer, strict=True)]


def regex_match(prompts: Column, completions: list[str], pattern: str | Column, **_: Any) -> list[float]:
    """``re.fullmatch`` of a pattern column, or of one pattern for every row (``functools.partial``)."""
    patterns = [pattern] * len(completions) if isinstance(pattern, str) else pattern
    return [regex_match_score(c, p) for c, p in zip(completions, patterns, strict=True)]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "copy": char_match,  # the built-in tasks' own (task.type copy / reverse)
    "reverse": char_match,
    "product": char_match,  # the answer's digits in place (task.type product)
    "char_match_strict": char_match_strict,
    "math_answer": math_answer,
    "countdown": countdown,
    "exact_match": exact_match,
    "regex_match": regex_match,
}
