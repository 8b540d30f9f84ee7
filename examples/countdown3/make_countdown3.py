"""Write the small countdown task's dataset: reach a target from three digits with + - *.

    python examples/countdown3/make_countdown3.py data/countdown3.jsonl

Each row is ``{"prompt": "3,5,7->22:", "numbers": [3, 5, 7], "target": 22, "answer": "3*5+7"}``: for
every multiset of three digits 1..9 (165 of them), up to ``PER_SET`` targets in 1..``MAX_TARGET``
reachable as ``a op b op c`` (usual precedence, no brackets) with each digit used once, drawn by a seeded
generator, with one expression that reaches each (``answer``, found by enumeration and checked by the
same parser the reward uses; ``podsrl check`` scores it as a plausible completion). Every answer is 5
characters, so it fills ``rollout.max_new_tokens = 5``: the model learns the search, not where to stop
(with brackets and 8 tokens a tiny model found the digits and never a closed expression in 1,200 steps).
The same file on every run.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

from rollout_server.tasks.verifiers import evaluate_expression

PER_SET, MAX_TARGET, SEED = 3, 60, 0
SHAPE = "{0}{3}{1}{4}{2}"  # a op b op c


def solutions(numbers: tuple[int, int, int]) -> dict[int, str]:
    """Each integer target in 1..MAX_TARGET that some ``a op b op c`` over ``numbers`` reaches, and the
    first such expression in lexicographic order."""
    found: dict[int, str] = {}
    exprs = {
        SHAPE.format(*perm, *ops)
        for perm in itertools.permutations(numbers)
        for ops in itertools.product("+-*", repeat=2)
    }
    for text in sorted(exprs):
        value, literals = evaluate_expression(text)
        assert sorted(literals) == sorted(numbers)
        if value.denominator == 1 and 1 <= value <= MAX_TARGET and int(value) not in found:
            found[int(value)] = text
    return found


def rows() -> list[dict[str, object]]:
    rng = random.Random(SEED)
    out: list[dict[str, object]] = []
    for numbers in itertools.combinations_with_replacement(range(1, 10), 3):
        found = solutions(numbers)
        for target in sorted(rng.sample(sorted(found), min(PER_SET, len(found)))):
            a, b, c = numbers
            out.append(
                {
                    "prompt": f"{a},{b},{c}->{target}:",
                    "numbers": list(numbers),
                    "target": target,
                    "answer": found[target],
                }
            )
    return out


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "data/countdown3.jsonl")
    data = rows()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {len(data)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
