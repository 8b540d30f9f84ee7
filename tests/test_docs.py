"""Docs that are generated from code stay in sync with it."""

from helpers import ROOT

from protocol.config import config_reference


def test_config_reference_is_current():
    assert (ROOT / "docs" / "CONFIG.md").read_text().strip() == config_reference().strip(), \
        "docs/CONFIG.md is stale: run `podsrl config --reference > docs/CONFIG.md`"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command in readme
