"""The console script: instant help, and config errors that name the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, child_env

from launcher.cli import podsrl_command


def podsrl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("cmd", ["run", "selector", "rollout", "learner", "config"])
def test_help_of_every_command(cmd):
    res = podsrl(cmd, "--help")
    assert res.returncode == 0 and "--config" in res.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys; from launcher.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported for --help'"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_invalid_config_exits_2_naming_the_key_and_the_reference():
    res = podsrl("run", "selector.keep=99", "learner.bogus=1")
    assert res.returncode == 2
    assert "learner.bogus" in res.stderr and "docs/CONFIG.md" in res.stderr


def test_config_rejects_two_links_on_one_port():
    res = podsrl("config", "net.group_port=6000", "net.announce_port=6000")
    assert res.returncode == 2, res.stdout
    assert "net.group_port and net.announce_port are both 6000" in res.stderr and "own" in res.stderr


def test_config_prints_resolved_toml():
    res = podsrl("config", "max_staleness=0", "learner.loss.type=m2po")
    assert res.returncode == 0 and "max_staleness = 0" in res.stdout and 'type = "m2po"' in res.stdout


def test_podsrl_command_runs_the_default_config_in_the_run_dir(tmp_path: Path) -> None:
    cmd = podsrl_command(tmp_path / "run", ["max_staleness=0"])
    assert cmd[:5] == [sys.executable, "-m", "launcher.cli", "run", "--config"]
    assert Path(cmd[5]) == ROOT / "configs" / "tiny.toml"
    res = podsrl("config", *cmd[4:])  # the same config file and overrides, resolved
    assert res.returncode == 0, res.stderr
    assert f'dir = "{tmp_path / "run"}"' in res.stdout and "max_staleness = 0" in res.stdout
