"""Write the two-digit addition task's dataset: every ``a+b`` with 10 <= a, b <= 99, answered in 3 digits.

    python examples/add2/make_add2.py data/add2.jsonl

Each row is ``{"prompt": "47+38=", "answer": "085"}`` (8,100 rows, 300 KB). Most sums carry into the
tens or the hundreds, which the one-digit sums of ``examples/arith`` never need. The answer is
zero-padded to three digits so that every answer fills ``rollout.max_new_tokens = 3``: the model
learns the digits, not where to stop (a tiny model trained on bare answers never learned to stop in
1,500 steps, and the reward of a 3-digit answer followed by junk is capped). ``configs/add2.toml``
trains on it with the built-in ``char_match_strict`` reward (the digits in place: partial credit on
the way, 1.0 only for the exact sum).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(low: int = 10, high: int = 99) -> list[dict[str, str]]:
    return [
        {"prompt": f"{a}+{b}=", "answer": f"{a + b:03d}"} for a in range(low, high + 1) for b in range(low, high + 1)
    ]


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "data/add2.jsonl")
    data = rows()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {len(data)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
