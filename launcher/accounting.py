"""Where a run's generation went: generated, trained, dropped (by reason), idle, per rollout server.

    podsrl run ...                      # prints it as its last lines
    python -m launcher.accounting RUN   # the same for a finished run directory

Sources, each the truth for one number (docs/METRICS.md, 'Accounting'):

- **generated**: each rollout server's own ``total/groups_sent`` (written when it stops; the selector's
  ``groups/received/<server>`` when a server was killed before it could write it);
- **trained**: the learner's audit trail ``metrics/trained_groups.jsonl``, one line per update with the
  identity of every group it trained;
- **dropped**: the selector's ``total/*`` counters (``staleness/dropped/<server>`` and the rest);
- **idle**: each rollout server's ``total/idle_s``, the seconds it waited for a work grant.

``share ratio`` = (a server's share of trained groups) / (its share of generated groups): 1.0 means its
work is trained in proportion to what it made; below 1 its groups are discarded more than others'.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.metrics import read_metrics


@dataclass
class ServerAccount:
    name: str
    generated: int = 0
    received: int = 0  # by the selector
    trained: int = 0
    stale: int = 0  # dropped as too stale
    idle_s: float = 0.0
    counted_by_server: bool = False  # False: generated is the selector's count (the server left no total)


@dataclass
class Accounting:
    servers: dict[str, ServerAccount] = field(default_factory=dict)
    selector: dict[str, float] = field(default_factory=dict)  # the selector's total/* counters, prefix removed

    @property
    def generated(self) -> int:
        return sum(s.generated for s in self.servers.values())

    @property
    def trained(self) -> int:
        return sum(s.trained for s in self.servers.values())

    @property
    def waste(self) -> float:
        """Generated groups never trained, as a fraction of generated ones (0 when nothing was generated)."""
        return 1 - self.trained / self.generated if self.generated else 0.0

    def share_ratio(self, name: str) -> float | None:
        s = self.servers[name]
        if not (s.generated and self.generated and self.trained):
            return None
        return (s.trained / self.trained) / (s.generated / self.generated)

    def length(self, what: str) -> float | None:
        """Mean completion length of all n completions of the groups ``received`` or ``trained``."""
        tokens, completions = (
            self.selector.get(f"length/{what}_tokens"),
            self.selector.get(f"length/{what}_completions"),
        )
        return tokens / completions if tokens is not None and completions else None

    def dropped(self) -> dict[str, int]:
        """Groups the selector received and did not buffer, by reason."""
        keys = (
            "staleness/dropped",
            "staleness/exact_surplus",
            "selector/zero_variance_dropped",
            "selector/dropped_learner_silent",
            "restart/discarded_groups",
        )
        return {k: int(self.selector[k]) for k in keys if self.selector.get(k)}

    def lines(self) -> list[str]:
        if not self.servers:
            return ["accounting: no rollout server metrics found"]
        gen, trained = self.generated, self.trained
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped().items()) or "none"
        out = [
            f"generated {gen} groups, trained {trained} ({trained / gen:.1%}), never trained {gen - trained} "
            f"({self.waste:.1%}); dropped at the selector: {dropped}"
            if gen
            else "generated nothing"
        ]
        lg, lt = self.length("received"), self.length("trained")
        if lg is not None and lt is not None:
            out.append(f"mean completion length: generated {lg:.2f}, trained {lt:.2f} tokens ({lt / lg:.3f}x)")
        for name, s in sorted(self.servers.items()):
            ratio = self.share_ratio(name)
            out.append(
                f"  {name}: generated {s.generated}{'' if s.counted_by_server else ' (selector count)'}, "
                f"trained {s.trained}, stale {s.stale}, idle {s.idle_s:.1f}s, share ratio "
                f"{'-' if ratio is None else f'{ratio:.2f}'}"
            )
        return out

    def metrics(self) -> dict[str, float]:
        """Flat numbers for summaries and JSON."""
        out: dict[str, float] = {"generated": self.generated, "trained": self.trained, "waste": self.waste}
        for what in ("received", "trained"):
            length = self.length(what)
            if length is not None:
                out[f"length/{what}"] = length
        for name, s in self.servers.items():
            ratio = self.share_ratio(name)
            out.update({f"generated/{name}": s.generated, f"trained/{name}": s.trained, f"idle_s/{name}": s.idle_s})
            if ratio is not None:
                out[f"share_ratio/{name}"] = ratio
        return out


def _totals(records: list[dict[str, Any]]) -> dict[str, float]:
    """The last ``total/*`` values of a metrics file, prefix removed."""
    out: dict[str, float] = {}
    for r in records:
        out.update({k[len("total/") :]: v for k, v in r.items() if k.startswith("total/")})
    return out


def trained_per_server(path: Path) -> Counter[str]:
    """Groups trained per rollout server, from the learner's audit trail."""
    return Counter(g[0] for r in (read_metrics(path) if path.exists() else []) for g in r["groups"])


def account(run_dir: str | Path) -> Accounting:
    metrics = Path(run_dir) / "metrics"
    selector_file = metrics / "selector.jsonl"
    acc = Accounting(selector=_totals(read_metrics(selector_file)) if selector_file.exists() else {})
    files = {p.name[len("rollout-") : -len(".jsonl")]: p for p in metrics.glob("rollout-*.jsonl")}
    seen = {k[len("groups/received/") :] for k in acc.selector if k.startswith("groups/received/")}
    trained = trained_per_server(metrics / "trained_groups.jsonl")
    for name in sorted(set(files) | seen | set(trained)):
        own = _totals(read_metrics(files[name])) if name in files else {}
        received = int(acc.selector.get(f"groups/received/{name}", 0))
        acc.servers[name] = ServerAccount(
            name,
            generated=int(own.get("groups_sent", received)),
            received=received,
            trained=trained[name],
            stale=int(acc.selector.get(f"staleness/dropped/{name}", 0)),
            idle_s=float(own.get("idle_s", 0.0)),
            counted_by_server="groups_sent" in own,
        )
    return acc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    for line in account(args[0]).lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
