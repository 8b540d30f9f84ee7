"""Write the arithmetic example's dataset: every ``a+b`` (a, b < LIMIT) as a GSM8K-format row.

    python examples/arith/make_data.py data/arith.jsonl [LIMIT]     # LIMIT defaults to 10

Each row is ``{"prompt": "3+4=", "answer": "3+4=7\\n#### 7"}``: the answer column is a GSM8K-style
solution whose ``#### 7`` the built-in ``math_answer`` verifier reads. ``configs/arith.toml`` trains
on it (holding out 20% of the rows for eval).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(limit: int = 10) -> list[dict[str, str]]:
    return [
        {"prompt": f"{a}+{b}=", "answer": f"{a}+{b}={a + b}\n#### {a + b}"} for a in range(limit) for b in range(limit)
    ]


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "data/arith.jsonl")
    data = rows(int(argv[1]) if len(argv) > 1 else 10)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {len(data)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
