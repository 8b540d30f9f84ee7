"""Run every benchmark and record the results.

    python -m bench                    # all: codec, selector, rollout, weights, training (~10 min on 2 cores)
    python -m bench codec selector     # some
    python -m bench --quick            # tiny sizes, seconds (a smoke test, not figures to quote)

Writes ``bench/results.json`` (machine-readable) and, for a full run of all benchmarks,
``docs/BENCHMARKS.md`` (the table, the command, the machine and the date).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import time

from bench.common import ROOT, Result, machine, print_results, save

BENCHES = ("codec", "selector", "rollout", "weights", "training")


def markdown(results: list[Result], command: str, seconds: float) -> str:
    info = machine()
    lines = [
        "# Benchmarks", "",
        f"Latest full run: {datetime.date.today().isoformat()}, `{command}` ({seconds / 60:.1f} min).", "",
        f"Machine: {info.get('cpu', '?')}, {info['cpus']} CPUs, torch {info.get('torch')}, "
        f"CUDA: {info.get('cuda') or 'none'}, Python {info['python']}.", "",
        "Every row is measured side by side with its peer in the same run; numbers are medians. The machine",
        "is shared and noisy, so compare ratios, not absolute values across runs. Raw results:",
        "`bench/results.json`.", "",
        "| benchmark | case | podsrl | peer | ratio | goal | met |", "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peer = f"{r.peer_value:.4g} {r.unit} ({r.peer})" if r.peer_value is not None else r.peer
        ratio = f"{r.ratio:.2f}x ({r.ratio_means})" if r.ratio is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(f"| {r.bench} | {r.case} | {r.value:.4g} {r.unit} | {peer} | {ratio} | {r.goal} | {met} |")
    lines += ["", "## Notes per row", ""]
    lines += [f"- **{r.bench} / {r.case}**: {r.notes}" for r in results if r.notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=[], metavar="NAME",
                        help=f"benchmarks to run (default all): {', '.join(BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; for smoke tests, not for quoting")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    names = args.names or list(BENCHES)
    t0 = time.monotonic()
    results: list[Result] = []
    for name in names:
        print(f"== {name}", flush=True)
        got = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        print_results(got)
        results += got
    out = ROOT / "bench" / ("results-quick.json" if args.quick else "results.json")
    if not args.quick and args.names:  # a partial run updates its rows in the full record
        old = json.loads(out.read_text()) if out.exists() else []
        keep = [Result(**r) for r in old if r["bench"] not in names]
        results = keep + results
    save(results, out)
    if not args.quick and not args.names:
        command = "python -m bench"
        (ROOT / "docs" / "BENCHMARKS.md").write_text(markdown(results, command, time.monotonic() - t0))
        print("wrote docs/BENCHMARKS.md", flush=True)
    print(f"wrote {out.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
