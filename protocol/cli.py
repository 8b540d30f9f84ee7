"""``podsrl``: one console script for the whole pipeline and for each process alone.

    podsrl run                          # everything on this machine, default tiny CPU job
    podsrl run --config configs/tiny.toml max_staleness=0 learner.nproc=2
    podsrl selector --config run.toml   # one process, e.g. on its own machine
    podsrl rollout  --config run.toml --server-id box-7 net.selector_host=10.0.0.5 net.learner_host=10.0.0.5
    podsrl learner  --config run.toml   # runs: torchrun --standalone --nproc-per-node N -m learner.train ...
    podsrl config   --config run.toml   # print the fully resolved config as TOML

Overrides are ``section.key=value`` (TOML values); ``docs/CONFIG.md`` lists every key. ``--help``
is instant: nothing heavy (torch, transformers) is imported before the config is parsed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from protocol.config import Config, config_reference, load_config, to_toml


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", default=None, help="TOML run file (default: built-in defaults = configs/tiny.toml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. learner.lr=1e-3 max_staleness=0 (see docs/CONFIG.md)")
    return p


def process_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of one process's own entry point: its module docstring is its ``--help``."""
    return argparse.ArgumentParser(prog=prog, parents=[common_parser()], description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def configure(args: argparse.Namespace, role: str, quiet: bool = False) -> Config:
    """Parse the config (exit 2 with the reason if invalid) and set up logging for one process."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"podsrl {role}: {e}", file=sys.stderr)
        sys.exit(2)
    # Never reach for a model hub: every model is local (DESIGN.md), and progress bars only clutter logs.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format=f"%(asctime)s {role} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return cfg


def torchrun_command(cfg_path: str, overrides: list[str], nproc: int) -> list[str]:
    """The exact torchrun line the launcher and ``podsrl learner`` use."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "learner.train"]
    return cmd + (["--config", cfg_path] if cfg_path else []) + list(overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="podsrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("run", help="the whole pipeline on this machine (selector, learner, rollout servers)",
                   parents=[common_parser()])
    sub.add_parser("selector", help="the selector alone", add_help=False)
    sub.add_parser("rollout", help="one rollout server alone", add_help=False)
    sub.add_parser("learner", help="the learner alone, through torchrun", parents=[common_parser()])
    conf = sub.add_parser("config", help="print the resolved config as TOML", parents=[common_parser()])
    conf.add_argument("--reference", action="store_true", help="print the reference of every key (docs/CONFIG.md)")
    if argv and argv[0] in ("selector", "rollout"):  # these own their full argument parsing
        from importlib import import_module

        module = {"selector": "selector.server", "rollout": "rollout_server.server"}[argv[0]]
        return int(import_module(module).main(argv[1:]))
    args = parser.parse_args(argv)
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
    if args.cmd == "learner":
        cfg = configure(args, role="learner")
        cmd = torchrun_command(args.config or "", args.overrides, cfg.learner.nproc)
        os.execv(cmd[0], cmd)
    from protocol.launch import launch

    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
