"""``podsrl``: one console script for the whole pipeline and for each process alone.

    podsrl run                          # everything on this machine, default tiny CPU job
    podsrl run --config configs/arith.toml    # a tiny model learning GSM8K-format arithmetic on text
    podsrl run --config configs/tiny.toml max_staleness=0 learner.nproc=2
    podsrl selector --config run.toml   # one process, e.g. on its own machine
    podsrl rollout  --config run.toml --server-id box-7 net.selector_host=10.0.0.5 net.learner_host=10.0.0.5
    podsrl learner  --config run.toml   # runs: torchrun --standalone --nproc-per-node N -m learner.train ...
    podsrl learner  --config run.toml learner.nnodes=2 learner.node_rank=1 learner.rdzv_endpoint=10.0.0.5:29400
                                        # one node of a multi-node learner (torchrun's c10d rendezvous)
    podsrl config   --config run.toml   # print the fully resolved config as TOML
    podsrl check    --config run.toml   # the start-up checks alone: model, tokenizer, dataset, rewards
    podsrl sweep --grid configs/sweeps/staleness.toml   # configurations x seeds, then a summary table
    podsrl plot runs/sweeps/staleness   # figures of a sweep (or of one run directory)
    podsrl export runs/tiny --merge out/   # the latest checkpoint as a transformers dir (LoRA merged in)
    podsrl export runs/tiny --adapter out/ # a LoRA run's adapter as a peft adapter directory

Overrides are ``section.key=value`` (TOML values); ``docs/CONFIG.md`` lists every key. ``--help``
is instant: nothing heavy (torch, transformers) is imported before the config is parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from launcher.export import add_export_parser
from protocol.cli import common_parser, configure
from protocol.config import config_reference, load_config, to_toml


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="podsrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser(
        "run", help="the whole pipeline on this machine (selector, learner, rollout servers)", parents=[common_parser()]
    )
    sub.add_parser("selector", help="the selector alone", add_help=False)
    sub.add_parser("rollout", help="one rollout server alone", add_help=False)
    sub.add_parser("learner", help="the learner alone, through torchrun", parents=[common_parser()])
    sub.add_parser(
        "check", help="run the start-up checks (model, tokenizer, dataset, rewards) and exit", parents=[common_parser()]
    )
    conf = sub.add_parser("config", help="print the resolved config as TOML", parents=[common_parser()])
    conf.add_argument("--reference", action="store_true", help="print the reference of every key (docs/CONFIG.md)")
    add_sweep_parser(sub)
    add_plot_parser(sub)
    add_keys_parser(sub)
    add_health_parser(sub)
    add_export_parser(sub)
    if argv and argv[0] in ("selector", "rollout"):  # these own their full argument parsing
        from importlib import import_module

        module = {"selector": "selector.server", "rollout": "rollout_server.server"}[argv[0]]
        return int(import_module(module).main(argv[1:]))
    args = parser.parse_args(argv)
    if args.cmd in ("sweep", "plot"):
        return int(args.handler(args, argv[1:]))
    if args.cmd == "keys":
        return keys_command(args)
    if args.cmd == "health":
        return health_command(args)
    if args.cmd == "export":
        from launcher.export import export_command

        return export_command(args)
    if args.cmd == "config":
        if args.reference:
            print(config_reference())
            return 0
        try:
            print(to_toml(load_config(args.config, args.overrides)), end="")
        except ValueError as e:
            print(f"podsrl config: {e}", file=sys.stderr)
            return 2
        return 0
    from launcher.preflight import PreflightError, preflight

    cfg = configure(args, role=args.cmd)
    if args.cmd == "run" and cfg.learner.nnodes > 1:
        print(
            f"podsrl run: learner.nnodes={cfg.learner.nnodes}, but podsrl run starts one machine: run "
            "`podsrl learner` on each node instead, and the selector and rollout servers alone (docs/DEPLOY.md)",
            file=sys.stderr,
        )
        return 2
    server = None
    if args.cmd == "run" and cfg.run.fork_server:  # torch imported once; the checks and each process fork from it
        from pathlib import Path

        from launcher.forkserver import call, start_server

        logs = Path(cfg.run.dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        server = start_server(logs / "forkserver.log")
    try:
        report = preflight(cfg) if server is None else call(server, preflight, cfg)
    except BaseException as e:
        if server is not None:  # no process of the run outlives it, the fork server included
            from launcher.forkserver import stop_server

            stop_server()
        if not isinstance(e, PreflightError):
            raise
        print(f"podsrl {args.cmd}: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        print(report)
        return 0
    if args.cmd == "learner":
        from launcher.launch import torchrun_command

        cmd = torchrun_command(args.config or "", args.overrides, cfg.learner.nproc, cfg.learner)
        os.execv(cmd[0], cmd)
    from launcher.launch import launch

    return launch(cfg, report, server)


def podsrl_command(run_dir: str | os.PathLike[str], overrides: Sequence[str] = ()) -> list[str]:
    """The command line of ``podsrl run`` of ``configs/tiny.toml`` (the default run) in ``run_dir``, then
    ``overrides``: this interpreter with ``-m launcher.cli``, so no installed console script is needed.
    What the benchmarks (``bench/``) and the end-to-end tests start, with the repository root as the working
    directory (or on PYTHONPATH) so that ``launcher`` is importable."""
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    return [sys.executable, "-m", "launcher.cli", "run", "--config", str(tiny), f"run.dir={run_dir}", *overrides]


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid of configurations x seeds, each a podsrl run; summary table (docs/STALENESS.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run the cartesian product of a grid's axes x seeds, each as `podsrl run` in <out>/<config>/seed<k>,\n"
            "one after another (or --parallel P at a time); a sweep started again skips finished runs. Then\n"
            "write <out>/summary.md and summary.csv: per configuration, IQM and 95% CI of the final reward,\n"
            "seeds reaching each reward threshold and when, throughput, learner idle time, staleness.\n\n"
            "  podsrl sweep --grid configs/sweeps/staleness.toml --parallel 2\n"
            "  podsrl sweep --axis max_staleness=0,2 --axis learner.lr=1e-3,3e-3 --seeds 3 run.steps=200\n"
            "  podsrl sweep --grid configs/sweeps/staleness.toml --print-commands   # run them elsewhere\n"
            "  podsrl sweep --summarize runs/sweeps/staleness                       # rebuild the table\n\n"
            "Any config key can be an axis (docs/CONFIG.md); the grid file format is in docs/STALENESS.md."
        ),
    )
    p.add_argument("--grid", metavar="FILE", help="TOML grid file: config, seeds, thresholds, window, [base], [grid]")
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="base run file (overrides the grid file's `config`); alone, without --grid or --axis: its seeds",
    )
    p.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an axis from the command line (repeatable; replaces the grid file's axis of that key)",
    )
    p.add_argument(
        "--seeds", metavar="N", help="seeds 0..N-1, or a TOML list like [0,3,7] (default: the grid's, else 3)"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="P",
        help="runs at once (default 1: on a small machine parallel runs slow each other down)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="sweep directory (default: the grid's `out`, else runs/sweeps/<grid file name>, else runs/sweep)",
    )
    p.add_argument(
        "--print-commands", action="store_true", help="print one `podsrl run ...` line per run instead of running them"
    )
    p.add_argument(
        "--port-base",
        type=int,
        metavar="PORT",
        help="run i uses ports PORT+4i..PORT+4i+3 (default: "
        "free ports chosen at each start; printed commands then leave them to each podsrl run, "
        "which picks free ones unless the config sets them)",
    )
    p.add_argument("--summarize", metavar="DIR", help="only rebuild DIR/summary.md and summary.csv from its runs")
    p.add_argument("--thresholds", metavar="R1,R2", help="reward thresholds for time-to-threshold (default 0.6,0.8)")
    p.add_argument("--window", type=int, metavar="STEPS", help="steps averaged for time-to-threshold (default 10)")
    p.add_argument(
        "--reference",
        metavar="CONFIG",
        help="configuration the others are compared with (probability of improvement; default: the first)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run, e.g. run.steps=200")
    p.set_defaults(handler=sweep_command)


def sweep_command(args: argparse.Namespace, argv: list[str]) -> int:
    """``podsrl sweep``: launcher/sweep.py runs it, launcher/summary.py makes the table."""
    from pathlib import Path

    from launcher.summary import parse_thresholds, write_summary
    from launcher.sweep import SweepError, build_grid, sweep

    try:
        if args.summarize:
            print(
                write_summary(
                    Path(args.summarize),
                    parse_thresholds(args.thresholds) if args.thresholds else None,
                    args.window,
                    args.reference,
                )
            )
            return 0
        if not args.grid and not args.axis and not args.config:
            raise SweepError(
                "nothing to sweep: give --grid FILE (e.g. configs/sweeps/staleness.toml), --axis KEY=V1,V2, "
                "or --config FILE alone for its seeds (or --summarize DIR)"
            )
        grid = build_grid(args.grid, args.config, args.axis, args.seeds, args.thresholds, args.window)
        out = Path(args.out or grid.out or (f"runs/sweeps/{Path(args.grid).stem}" if args.grid else "runs/sweep"))
        return sweep(
            argv, grid, out, args.overrides, args.parallel, args.port_base, args.print_commands, args.reference
        )
    except ValueError as e:  # SweepError, and config or metrics problems that name the fix
        print(f"podsrl sweep: {e}", file=sys.stderr)
        return 2


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="figures (PNG and SVG) of a sweep directory or of one run directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "  podsrl plot runs/sweeps/staleness   # reward vs step and vs wall-clock with 95% bands, staleness\n"
            "                                      # histograms, throughput and idle time vs K, IQM intervals\n"
            "  podsrl plot runs/tiny               # one run: reward, staleness, loss diagnostics, throughput\n\n"
            "Needs matplotlib: pip install -e '.[plot]'."
        ),
    )
    p.add_argument(
        "dirs", nargs="+", metavar="RUN_DIR", help="sweep directories (podsrl sweep --out) or run directories"
    )
    p.add_argument("--out", metavar="DIR", help="where the figures go (default: <RUN_DIR>/plots)")
    p.add_argument("--thresholds", metavar="R1,R2", help="reward thresholds (default: the sweep's, else 0.6,0.8)")
    p.add_argument(
        "--window", type=int, metavar="STEPS", help="steps of reward smoothing (default: the sweep's, else 10)"
    )
    p.set_defaults(handler=plot_command)


def plot_command(args: argparse.Namespace, argv: list[str]) -> int:
    """``podsrl plot``: launcher/plot.py draws the figures."""
    from pathlib import Path

    try:
        from launcher.plot import plot
    except ImportError as e:
        print(f"podsrl plot: {e}; install matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    from launcher.summary import parse_thresholds

    dirs = [Path(d).resolve() for d in args.dirs]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):  # e.g. several seed0 runs: keep the config's name too
        names = [str(Path(d.parent.name) / d.name) for d in dirs]
    try:
        thresholds = parse_thresholds(args.thresholds) if args.thresholds else None
        for d, name in zip(dirs, names, strict=True):
            out = Path(args.out) / name if args.out and len(dirs) > 1 else Path(args.out or d / "plots")
            for path in plot(d, out, thresholds, args.window):
                print(path)
    except ValueError as e:
        print(f"podsrl plot: {e}", file=sys.stderr)
        return 2
    return 0


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create CurveZMQ key pairs for an authenticated run (docs/RELIABILITY.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Create the missing key pairs in DIR (existing ones are kept): selector, learner, and one per\n"
            "rollout server, named by its --server-id. Then run every process with net.keys_dir=DIR.\n\n"
            "  podsrl keys keys --rollout 2            # rollout-0, rollout-1 (the names podsrl run gives)\n"
            "  podsrl keys keys --rollout box-7 box-8  # named servers; run again to add more\n\n"
            "DIR/selector.key, DIR/learner.key: public (every machine); DIR/rollout/*.key: the rollout\n"
            "servers the selector and learner accept; *.key_secret: only on the machine of that process."
        ),
    )
    p.add_argument("dir", metavar="DIR", help="key directory (created if missing)")
    p.add_argument(
        "--rollout",
        nargs="+",
        default=[],
        metavar="N|NAME",
        help="a count N (rollout-0 .. rollout-N-1) or the --server-id of each rollout server",
    )


def keys_command(args: argparse.Namespace) -> int:
    """``podsrl keys``: protocol/auth.py writes the files."""
    from pathlib import Path

    from protocol.auth import AuthError, create_keys

    names = args.rollout
    if len(names) == 1 and names[0].isdigit():
        names = [f"rollout-{i}" for i in range(int(names[0]))]
    keys_dir = Path(args.dir)
    try:
        made = create_keys(keys_dir, names)
    except AuthError as e:
        print(f"podsrl keys: {e}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {p}" for p in made) or f"podsrl keys: every key already exists in {keys_dir}")
    print(
        f"Run every process with net.keys_dir={keys_dir} (and net.auth=on on loopback).\n"
        f"Selector and learner machine: all of {keys_dir}/ except rollout/*.key_secret (delete those once "
        "copied).\nEach rollout machine: selector.key, learner.key, rollout/<server-id>.key_secret "
        "(docs/RELIABILITY.md)."
    )
    return 0


def add_health_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "health",
        help="exit 0 if a selector, learner or rollout process is alive (the images' HEALTHCHECK)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Find the process (--pid, else the first podsrl selector, learner or rollout process in /proc: in a\n"
            "container, its own), read its command line and config, and check it: the selector and the learner\n"
            "accept TCP connections on the ports they bind; a rollout server wrote its metrics file within\n"
            "--max-age seconds. Exit 0 with one line if alive, 1 with the reason if not. Linux only.\n\n"
            "  podsrl health                 # in a container: `docker inspect` shows the line\n"
            "  podsrl health --pid 4242      # one process of a run on this machine"
        ),
    )
    p.add_argument("--pid", type=int, help="the process to check (default: the first one found in /proc)")
    p.add_argument(
        "--max-age",
        type=float,
        default=600.0,
        metavar="S",
        help="rollout: its metrics file must be newer than this (default 600: waiting for a slow "
        "learner is not a failure)",
    )


# A podsrl process's command line names its role after `podsrl` (or `-m launcher.cli`), or its module after
# `-m` (torchrun's `-m learner.train`, the launcher's children).
ROLE_MODULES = {"selector.server": "selector", "learner.train": "learner", "rollout_server.server": "rollout"}


def health_command(args: argparse.Namespace) -> int:
    """``podsrl health``: is a selector, learner or rollout process alive, as its own config describes it."""
    import socket
    import time
    from pathlib import Path

    def role_and_args(pid: int) -> tuple[str, list[str]] | None:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            return None
        for i in range(1, len(argv)):
            before, token = argv[i - 1], argv[i]
            if (before == "-m" and token in ROLE_MODULES) or (
                token in ROLE_MODULES.values() and (os.path.basename(before) == "podsrl" or before == "launcher.cli")
            ):
                return ROLE_MODULES.get(token, token), argv[i + 1 :]
        return None

    pids = [args.pid] if args.pid else sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    found = next(((pid, hit) for pid in pids if pid != os.getpid() and (hit := role_and_args(pid))), None)
    if found is None:
        who = f"process {args.pid} is not" if args.pid else "no process here is"
        print(f"podsrl health: {who} a running podsrl selector, learner or rollout server", file=sys.stderr)
        return 1
    pid, (role, rest) = found
    own = argparse.ArgumentParser(add_help=False)  # the options of the role's own parser that take a value
    own.add_argument("--config", "-c")
    own.add_argument("--server-id")
    own.add_argument("--seed")
    own.add_argument("overrides", nargs="*")
    parsed, _ = own.parse_known_args(rest)
    cwd = Path(f"/proc/{pid}/cwd").resolve()  # relative paths in its config are relative to its directory
    try:
        cfg = load_config(cwd / parsed.config if parsed.config else None, parsed.overrides)
    except ValueError as e:
        print(f"podsrl health: {role} pid {pid}: its config does not load: {e}", file=sys.stderr)
        return 1
    problem, detail = "", ""
    if role == "rollout":
        server_id = parsed.server_id or f"{socket.gethostname()}-{pid}"  # the rollout server's own default
        metrics = cwd / cfg.run.dir / "metrics" / f"rollout-{server_id}.jsonl"
        try:
            age = time.time() - metrics.stat().st_mtime
        except OSError:
            problem = f"no metrics yet at {metrics} (written once the server has weights)"
        else:
            detail = f"metrics written {age:.0f}s ago"
            if age > args.max_age:
                problem = f"its metrics {metrics} are {age:.0f}s old (more than --max-age {args.max_age:g})"
    elif role == "learner" and cfg.learner.node_rank > 0:  # global rank 0, on node 0, binds the ports
        detail = f"node {cfg.learner.node_rank} of {cfg.learner.nnodes} (node 0 binds the learner's ports)"
    else:
        host = {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1"}.get(cfg.net.bind_host, cfg.net.bind_host)
        keys = ("group_port", "batch_port") if role == "selector" else ("announce_port", "weights_port")
        for key in keys:
            port = getattr(cfg.net, key)
            try:
                socket.create_connection((host, port), timeout=5).close()
            except OSError as e:
                problem = f"nothing accepts connections on {host}:{port} (net.{key}): {e}"
                break
        detail = "accepting on " + ", ".join(f"{host}:{getattr(cfg.net, k)}" for k in keys)
    if problem:
        print(f"podsrl health: {role} pid {pid}: {problem}", file=sys.stderr)
        return 1
    print(f"{role} pid {pid}: alive, {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
