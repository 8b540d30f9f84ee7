"""How one podsrl process reads its config: the shared argument parser and logging set-up.

Every role's entry point (``selector.server``, ``rollout_server.server``, ``learner.train``) builds its
parser with :func:`process_parser` and reads its config with :func:`configure`; the console script
``podsrl`` (``launcher/cli.py``) only dispatches to them. Nothing heavy is imported here, so
``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from protocol.config import Config, load_config
from protocol.limits import open_files_needed, raise_open_files


def die_with_parent(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies, however it dies (SIGKILL
    included). Linux only (prctl PR_SET_PDEATHSIG): returns False elsewhere, where nothing is set."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    return True


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config", "-c", default=None, help="TOML run file (default: built-in defaults = configs/tiny.toml)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. learner.lr=1e-3 max_staleness=0 (see docs/CONFIG.md)",
    )
    return p


def process_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of one process's own entry point: its module docstring is its ``--help``."""
    return argparse.ArgumentParser(
        prog=prog, parents=[common_parser()], description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


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
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format=f"%(asctime)s.%(msecs)03d {role} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=[CappedHandler(cfg.run.max_log_mib)],
    )
    need = open_files_needed(role, cfg.selector.max_peers)  # one or two per rollout server (protocol/limits.py)
    if need:
        raise_open_files(need, f"the {role} with selector.max_peers={cfg.selector.max_peers}")
    return cfg


class CappedHandler(logging.StreamHandler):
    """stderr (the process's log file under ``podsrl run``), silent after ``max_mib`` MiB of lines (0 = never)
    but for one line saying so: a process that logs in a loop cannot fill the disk (``run.max_log_mib``)."""

    def __init__(self, max_mib: float) -> None:
        super().__init__()
        self.max_mib, self.max_bytes, self.written, self.dropped = max_mib, int(max_mib * 2**20), 0, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.max_bytes and self.written > self.max_bytes:
            self.dropped += 1
            return
        try:
            line = self.format(record) + self.terminator
            self.written += len(line.encode(errors="replace"))
            if self.max_bytes and self.written > self.max_bytes:
                line = f"log capped at {self.max_mib:g} MiB (run.max_log_mib): further lines dropped\n"
            self.stream.write(line)
            self.flush()
        except Exception:
            self.handleError(record)
