"""Built-in text verifiers: real answer formats, the countdown game, hostile input, properties."""

import contextlib
import functools
import signal
import time
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rollout_server.tasks.verifiers import (
    BUILTIN_REWARDS,
    COUNTDOWN_FORMAT_SCORE,
    ExpressionError,
    char_match,
    char_match_strict,
    countdown,
    evaluate_expression,
    exact_match,
    extract_countdown_answer,
    extract_final_answer,
    math_answer,
    normalize_number,
    regex_match,
)

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Each clip costs $25.71, so she made 48 * 25.71 = <<48*25.71=1234.08>>1234.08 dollars.\n"
    "Rounding to whole dollars, she made 1,234 dollars.\n"
    "#### 1,234"
)


def one_math(completion, answer):
    return math_answer(["q"], [completion], answer=[answer])[0]


def one_countdown(completion, numbers, target):
    return countdown(["q"], [completion], numbers=[numbers], target=[target])[0]


# ---------------------------------------------------------------- math_answer: real formats


def test_gsm8k_reference_solution_is_extracted_like_a_completion():
    assert extract_final_answer(GSM8K_SOLUTION) == "1,234"
    assert one_math("She made 1234 dollars.\n#### 1234", GSM8K_SOLUTION) == 1.0
    assert one_math("so the answer is\n#### $1,234.00", GSM8K_SOLUTION) == 1.0
    assert one_math("#### 1,235", GSM8K_SOLUTION) == 0.0
    assert one_math("She made 1234 dollars.", GSM8K_SOLUTION) == 0.0  # no marker


def test_boxed_latex_fraction_equals_decimal_reference():
    assert one_math(r"Half of 3/2 is $\boxed{\frac{3}{4}}$.", "0.75") == 1.0
    assert one_math(r"\boxed{\dfrac{3}{4}}", "3/4") == 1.0
    assert one_math(r"\boxed{-\tfrac{6}{8}}", "-0.75") == 1.0
    assert one_math(r"\boxed{\frac{3}{5}}", "0.75") == 0.0
    assert extract_final_answer(r"x \boxed{\frac{1}{\sqrt{2}}} y") == r"\frac{1}{\sqrt{2}}"


def test_later_marker_wins():
    assert one_math("First \\boxed{72}, on reflection:\n#### 71", 71) == 1.0
    assert one_math("First \\boxed{72}, on reflection:\n#### 71", 72) == 0.0
    assert one_math("#### 71\nactually \\boxed{72}", 72) == 1.0
    assert one_math(r"\boxed{1} then \boxed{2}", 2) == 1.0


def test_number_normalisation():
    assert one_math("#### $18.00", "18") == 1.0
    assert one_math("#### 50%", 50) == 1.0
    assert one_math("#### 72 dollars", "72") == 1.0
    assert one_math("#### 5 cm", "5") == 1.0
    assert one_math(r"\boxed{\$18}", 18) == 1.0
    assert one_math(r"\boxed{5\text{ cm}^2}", 5) == 1.0
    assert one_math("#### +3.0", "3") == 1.0
    assert one_math("#### -0", 0) == 1.0
    assert one_math("#### 0.5", "1/2") == 1.0
    assert one_math("#### 72.", 72.0) == 1.0
    assert one_math("#### 1e3", 1000) == 0.0  # no scientific notation
    assert normalize_number("1,234.5") == normalize_number("1234.50") == "2469/2"
    assert normalize_number(r"1{,}234") == "1234"


def test_lookalikes_are_not_numbers():
    for text in ["1,2,3", "1,2345", "3 + 4", "5^2", "5/x", r"5 \times 10^3", "12.5.3", "abc", "", "-"]:
        assert normalize_number(text) is None, text
    assert one_math("#### 3 + 4", 3) == 0.0
    assert one_math("#### 5^2", 5) == 0.0
    assert one_math("#### 1/0", 0) == 0.0


def test_reference_as_int_float_and_non_numeric_strings():
    assert one_math(r"\boxed{72}", 72) == 1.0
    assert one_math(r"\boxed{0.1}", 0.1) == 1.0  # the float's decimal, not its binary value
    assert one_math(r"\boxed{100000000000000000000}", 1e20) == 1.0
    assert one_math(r"\boxed{(A)}", "(A)") == 1.0
    assert one_math(r"\boxed{x  +  1}", "x + 1") == 1.0  # whitespace collapsed
    assert one_math(r"\boxed{(B)}", "(A)") == 0.0
    assert one_math(r"\boxed{72}", float("nan")) == 0.0


def test_unicode_minus_and_digits_are_normalised_to_ascii():
    """Decision: U+2212 reads as '-', and Unicode decimal digits as their ASCII digits."""
    assert one_math("#### \u22125", "-5") == 1.0
    assert one_math("#### -5", "\u22125") == 1.0
    assert one_math("#### \u0667\u0662", 72) == 1.0  # Arabic-Indic 72
    assert one_math("#### \uff17\uff12", "72") == 1.0  # fullwidth 72
    assert one_math("#### \u0667\u0663", 72) == 0.0
    assert normalize_number("\u0967\u0968\u0969") == "123"  # Devanagari


# ---------------------------------------------------------------- countdown


def test_countdown_scores():
    assert one_countdown("<answer>(3 + 5) * 2</answer>", [3, 5, 2], 16) == 1.0
    assert one_countdown("<answer>2*(5+3)</answer>", [2, 3, 5], "16") == 1.0  # any order; target as str
    assert one_countdown("<answer>(3 + 5) / 2</answer>", [3, 5, 2], 16) == COUNTDOWN_FORMAT_SCORE
    assert one_countdown("<answer>(3 + 5) * 4</answer>", [3, 5, 2], 32) == 0.0  # wrong number
    assert one_countdown("<answer>(3 + 3) * 2</answer>", [3, 5, 2], 12) == 0.0  # 3 reused, 5 unused
    assert one_countdown("<answer>3 * 5</answer>", [3, 5, 2], 15) == 0.0  # 2 missing
    assert one_countdown("<answer>3 * 5 * 2 * 2</answer>", [3, 5, 2], 60) == 0.0  # extra number
    assert one_countdown("<answer>3 / (5 - 5) + 2</answer>", [3, 5, 5, 2], 2) == 0.0  # division by zero
    assert one_countdown("<answer>7 / 2 * 2</answer>", [7, 2, 2], 7) == 1.0  # exact fractions


def test_countdown_extraction():
    text = "<think>try <answer>1+1</answer></think>\nso <answer> (10 - 4) * 3 </answer>\nDone."
    assert extract_countdown_answer(text) == " (10 - 4) * 3 "
    assert one_countdown(text, [10, 4, 3], 18) == 1.0
    assert one_countdown("I think it is\n(10 - 4) * 3\n", [10, 4, 3], 18) == 1.0  # last line
    assert one_countdown("<answer>(10 - 4) * 3", [10, 4, 3], 18) == 0.0  # unclosed tag: last line has it
    assert one_countdown("(10 - 4) * 3 = 18", [10, 4, 3], 18) == 0.0  # '=' is not in the grammar


def test_countdown_grammar_rejections():
    malformed = ["9**9**9", "-3 + 5", "3 + -5", "(3 + 5", "3 + 5)", "3 5 +", "3 ^ 5", "1e5", "3(5)", "()", ""]
    for expr in malformed:
        with pytest.raises(ExpressionError):
            evaluate_expression(expr)
    assert one_countdown("<answer>9**9**9</answer>", [9, 9, 9], 9) == 0.0
    assert one_countdown("<answer>-3 + 5</answer>", [3, 5], 2) == 0.0
    assert one_countdown("<answer>\u0663 + 5</answer>", [3, 5], 8) == 0.0  # ASCII digits only
    with pytest.raises(ExpressionError, match="nested too deep"):
        evaluate_expression("(" * 33 + "1" + ")" * 33)
    assert evaluate_expression("(" * 31 + "1" + ")" * 31) == (1, [1])
    with pytest.raises(ExpressionError, match="literal too long"):
        evaluate_expression("1234567 + 1")
    with pytest.raises(ExpressionError, match="too many tokens"):
        evaluate_expression("+".join(["1"] * 33))
    with pytest.raises(ExpressionError, match="too long"):
        evaluate_expression(" " * 201)
    assert evaluate_expression("8 - 2 - 1") == (5, [8, 2, 1])  # left associative
    assert evaluate_expression("8 / 4 / 2") == (1, [8, 4, 2])
    assert evaluate_expression("2 + 3 * 4") == (14, [2, 3, 4])


# ---------------------------------------------------------------- exact_match / regex_match / batching


def test_exact_and_regex_match():
    out = exact_match(["q", "q", "q"], [" Paris\n", "paris", "Paris!"], answer=["Paris"] * 3)
    assert out == [1.0, 0.0, 0.0]
    assert exact_match(["q"], ["42"], answer=[42]) == [1.0]
    assert regex_match(["q", "q"], ["  abc123 ", "abc"], pattern=[r"[a-z]+\d+", r"[a-z]+\d+"]) == [1.0, 0.0]
    digits_only = functools.partial(regex_match, pattern=r"\d+")
    assert digits_only(["q", "q"], ["123", "12a"]) == [1.0, 0.0]
    assert regex_match(["q"], ["1" * 10_001], pattern=[r"\d+"]) == [0.0]  # too long: not matched at all


def test_batched_convention_and_registry():
    assert set(BUILTIN_REWARDS) == {
        "math_answer",
        "countdown",
        "exact_match",
        "regex_match",
        "copy",
        "reverse",
        "char_match_strict",
        "product",
    }
    columns = {
        "answer": ["4", "5"],
        "numbers": [[2, 2], [2, 3]],
        "target": [4, 5],
        "pattern": [r"\d", r"\d"],
        "completion_ids": [[1, 2], [3]],
        "unused_column": ["x", "y"],
    }
    completions = ["#### 4\n<answer>2+2</answer>", "<answer>2*3</answer>"]
    expected = {
        "math_answer": [1.0, 0.0],
        "countdown": [1.0, 0.1],
        "exact_match": [0.0, 0.0],
        "regex_match": [0.0, 0.0],
        "copy": [0.0, 0.0],
        "reverse": [0.0, 0.0],
        "char_match_strict": [0.0, 0.0],
        "product": [0.0, 0.0],
    }
    for name, fn in BUILTIN_REWARDS.items():
        out = fn(prompts=["p1", "p2"], completions=completions, **columns)
        assert out == expected[name], name
    assert BUILTIN_REWARDS["product"](["p"], ["56088"], answer=["56088"]) == [1.0]  # the digits in place
    with pytest.raises(ValueError):
        math_answer(["p"], ["#### 4"], answer=["4", "5"])  # a column of the wrong length is a bug


# ---------------------------------------------------------------- hostile input

HOSTILE = [
    "9" * 100_000,
    "#### " + "9" * 100_000,
    "#### " + "9" * 150,
    "\\boxed{" + "9" * 150 + "}",
    "\\boxed{" + "{" * 100_000,
    "<answer>9**9**9</answer>",
    "<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",
    "(" * 10_000 + "1" + ")" * 10_000,
    "#### \u0669" * 1000,
    "__import__('os').system('echo hi')",
    "<answer>__import__('os').system('echo hi')</answer>",
    '#### "; rm -rf /',
    "x" * 1_000_000,
    ("#### 1\n<answer>1+1</answer>\\boxed{" * 30_000)[:1_000_000],
    "a" * 1_000_000 + "!",
]


@contextlib.contextmanager
def hang_guard(seconds=5.0):
    """Fail a pathological call instead of hanging the suite (``re`` and Python loops see the alarm)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_completions_are_fast_and_bounded(text):
    # (a+)+$ backtracks exponentially: only the length guard keeps it off the 1 MB completions
    columns = {"answer": ["9" * 150], "numbers": [[9, 9, 9]], "target": [9], "pattern": [r"(a+)+$"]}
    for name, fn in BUILTIN_REWARDS.items():
        start = time.perf_counter()
        with hang_guard():
            (score,) = fn(["q"], [text], **columns)
        elapsed = time.perf_counter() - start
        assert isinstance(score, float) and 0.0 <= score <= 1.0, name
        if fn not in (char_match, char_match_strict):  # characters in place: "9" * 100_000 has the answer's 150
            assert score in (0.0, COUNTDOWN_FORMAT_SCORE), name
        assert elapsed < 1.0, (name, elapsed)


def test_huge_references_never_match_or_hang():
    start = time.perf_counter()
    assert one_math("#### " + "9" * 150, "9" * 150) == 0.0  # more than 100 digits: never a match
    assert one_math("#### 9", 10**5000) == 0.0  # str() of this int would raise
    assert exact_match(["q"], ["9"], answer=[10**5000]) == [0.0]
    assert normalize_number("9" * 101) is None
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------- properties

OPS = {
    "+": (1, lambda a, b: a + b),
    "-": (1, lambda a, b: a - b),
    "*": (2, lambda a, b: a * b),
    "/": (2, lambda a, b: a / b),
}


def draw_tree(data, leaves):
    """A random expression tree over ``leaves`` in order: an int, or (op, left, right, extra_parens)."""
    if len(leaves) == 1:
        return leaves[0]
    split = data.draw(st.integers(1, len(leaves) - 1))
    op = data.draw(st.sampled_from(sorted(OPS)))
    return (op, draw_tree(data, leaves[:split]), draw_tree(data, leaves[split:]), data.draw(st.booleans()))


def oracle(tree):
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right, _ = tree
    a, b = oracle(left), oracle(right)
    assume(not (op == "/" and b == 0))
    return OPS[op][1](a, b)


def render(tree, parent_prec=0, right_of=None):
    """Infix text with the parentheses precedence needs (plus some redundant ones)."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right, extra = tree
    prec = OPS[op][0]
    text = f"{render(left, prec)} {op} {render(right, prec, op)}"
    needed = prec < parent_prec or (prec == parent_prec and right_of in ("-", "/"))
    return f"({text})" if needed or extra else text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999_999), min_size=1, max_size=6), st.data())
def test_countdown_accepts_any_exact_expression_tree(numbers, data):
    tree = draw_tree(data, data.draw(st.permutations(numbers)))
    target = oracle(tree)
    completion = f"<think>...</think> <answer>{render(tree)}</answer>"
    assert one_countdown(completion, numbers, target) == 1.0
    assert one_countdown(completion, numbers, target + 1) == COUNTDOWN_FORMAT_SCORE


@settings(max_examples=200, deadline=None)
@given(st.integers())
def test_thousands_separators_do_not_change_the_number(x):
    assert normalize_number(str(x)) == normalize_number(f"{x:,}")
    if len(str(abs(x))) <= 100:
        assert normalize_number(f"{x:,}") == str(x)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_no_verifier_raises_on_arbitrary_text(completion, answer):
    columns = {"answer": [answer], "numbers": [[1, 2]], "target": [3], "pattern": [r"\w+"]}
    wrapped = [completion, f"#### {completion}", f"\\boxed{{{completion}}}", f"<answer>{completion}</answer>"]
    for text in wrapped:
        for fn in BUILTIN_REWARDS.values():
            (score,) = fn(["q"], [text], **columns)
            assert isinstance(score, float) and 0.0 <= score <= 1.0
