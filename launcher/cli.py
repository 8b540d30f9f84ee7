"""``podsrl``: one console script for the whole pipeline and for each process alone.

    podsrl run                          # everything on this machine, default tiny CPU job
    podsrl run --config configs/arith.toml    # a tiny model learning GSM8K-format arithmetic on text
    podsrl run --config configs/tiny.toml max_staleness=0 learner.nproc=2
    podsrl selector --config run.toml   # one process, e.g. on its own machine
    podsrl rollout  --config run.toml --server-id box-7 net.selector_host=10.0.0.5 net.learner_host=10.0.0.5
    podsrl learner  --config run.toml   # runs: torchrun --standalone --nproc-per-node N -m learner.train ...
    podsrl config   --config run.toml   # print the fully resolved config as TOML
    podsrl check    --config run.toml   # the start-up checks alone: model, tokenizer, dataset, rewards

Overrides are ``section.key=value`` (TOML values); ``docs/CONFIG.md`` lists every key. ``--help``
is instant: nothing heavy (torch, transformers) is imported before the config is parsed.
"""

from __future__ import annotations

import argparse
import os
import sys

from protocol.cli import common_parser, configure
from protocol.config import config_reference, load_config, to_toml


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
    sub.add_parser("check", help="run the start-up checks (model, tokenizer, dataset, rewards) and exit",
                   parents=[common_parser()])
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
    from launcher.preflight import PreflightError, preflight

    cfg = configure(args, role=args.cmd)
    try:
        report = preflight(cfg)
    except PreflightError as e:
        print(f"podsrl {args.cmd}: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        print(report)
        return 0
    if args.cmd == "learner":
        cmd = torchrun_command(args.config or "", args.overrides, cfg.learner.nproc)
        os.execv(cmd[0], cmd)
    from launcher.launch import launch

    return launch(cfg, report)


if __name__ == "__main__":
    sys.exit(main())
