"""Run every benchmark and record the results.

    python -m bench                    # all: codec ... flood, lora, fleet (~37 min on 2 cores)
    python -m bench codec selector     # some
    python -m bench --quick            # tiny sizes, seconds (a smoke test, not figures to quote)
    python -m bench --render           # rewrite docs/BENCHMARKS.md's table from bench/results.json
    .venv-vllm/bin/python -m bench vllm   # vLLM vs the torch engine (scripts/vllm-env.sh makes .venv-vllm)

Writes ``bench/results.json`` (machine-readable, with the command, date and machine) and, for a
full run of all benchmarks, the generated part of ``docs/BENCHMARKS.md`` (between its
``<!-- results -->`` markers; the hand-written analysis around them is kept).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time

from bench.common import ROOT, Result, machine, print_results, save

BENCHES = ("codec", "selector", "rollout", "weights", "training", "pacing", "startup", "flood", "lora", "fleet")
OPTIONAL = ("vllm", "learning")  # only by name: vllm in .venv-vllm; learning, the ~40 min suite of issue 20


BEGIN, END = "<!-- results -->", "<!-- /results -->"


def markdown(results: list[Result], meta: dict) -> str:
    info = meta["machine"]
    lines = [
        BEGIN,
        f"Latest full run: {meta['date']}, `{meta['command']}` ({meta['seconds'] / 60:.1f} min).",
        "",
        f"Machine: {info.get('cpu', '?')}, {info['cpus']} CPUs, torch {info.get('torch')}, "
        f"CUDA: {info.get('cuda') or 'none'}, Python {info['python']}.",
        "",
        "Every row is measured side by side with its peer in the same run; numbers are medians. The machine",
        "is shared and noisy, so compare ratios, not absolute values across runs. Raw results:",
        "`bench/results.json`.",
        "",
        "| benchmark | case | podsrl | peer | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peer = f"{r.peer_value:.4g} {r.unit} ({r.peer})" if r.peer_value is not None else r.peer
        ratio = f"{r.ratio:.2f}x ({r.ratio_means})" if r.ratio is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(f"| {r.bench} | {r.case} | {r.value:.4g} {r.unit} | {peer} | {ratio} | {r.goal} | {met} |")
    lines += ["", "## Notes per row", ""]
    lines += [f"- **{r.bench} / {r.case}**: {r.notes}" for r in results if r.notes]
    return "\n".join([*lines, END])


def render(results: list[Result], meta: dict) -> None:
    """Replace the generated block of docs/BENCHMARKS.md, keeping the hand-written text around it."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = f"{text.rstrip()}\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + markdown(results, meta) + tail)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names",
        nargs="*",
        default=[],
        metavar="NAME",
        help=f"benchmarks to run (default all): {', '.join(BENCHES)}; by name only: {', '.join(OPTIONAL)}",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes; for smoke tests, not for quoting")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/BENCHMARKS.md from results.json")
    args = parser.parse_args()
    out = ROOT / "bench" / ("results-quick.json" if args.quick else "results.json")
    if args.render:
        record = json.loads(out.read_text())
        render([Result(**r) for r in record["results"]], record["meta"])
        print("wrote docs/BENCHMARKS.md")
        return 0
    unknown = set(args.names) - set(BENCHES) - set(OPTIONAL)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES + OPTIONAL)}")
    names = args.names or list(BENCHES)
    t0 = time.monotonic()
    results: list[Result] = []
    for name in names:
        print(f"== {name}", flush=True)
        got = importlib.import_module(f"bench.{name}").run(quick=args.quick)
        print_results(got)
        results += got
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "seconds": time.monotonic() - t0,
        "machine": machine(),
    }
    if not args.quick and args.names and out.exists():  # a partial run updates its rows in the full record
        old = json.loads(out.read_text())
        results = [Result(**r) for r in old["results"] if r["bench"] not in names] + results
        meta = {**old["meta"], "partial_update": meta}
    save(results, meta, out)
    if not args.quick and not args.names:
        render(results, meta)
        print("wrote docs/BENCHMARKS.md", flush=True)
    print(f"wrote {out.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
