"""Docs that are generated from code stay in sync with it."""

import inspect
import re

from helpers import ROOT

import learner.losses
from protocol.config import config_reference
from rollout_server.tasks.verifiers import BUILTIN_REWARDS


def test_config_reference_is_current():
    assert (ROOT / "docs" / "CONFIG.md").read_text().strip() == config_reference().strip(), (
        "docs/CONFIG.md is stale: run `podsrl config --reference > docs/CONFIG.md`"
    )


def test_losses_doc_repeats_the_losses_docstring():
    """One text for the losses: docs/LOSSES.md holds learner/losses.py's docstring after its first
    paragraph, word for word (line breaks aside)."""
    body = inspect.cleandoc(learner.losses.__doc__ or "").split("\n\n", 1)[1]
    doc = (ROOT / "docs" / "LOSSES.md").read_text()
    assert " ".join(body.split()) in " ".join(doc.split()), (
        "docs/LOSSES.md's losses section differs from learner/losses.py's docstring: edit one, copy it to the other"
    )


def test_tasks_doc_lists_the_builtin_rewards():
    doc = (ROOT / "docs" / "TASKS.md").read_text()
    table = doc.split("### Built-in rewards", 1)[1].split("\n#", 1)[0]
    names = {
        n for row in table.splitlines()[2:] if row.startswith("|") for n in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert names == set(BUILTIN_REWARDS), "docs/TASKS.md's 'Built-in rewards' table must list verifiers.BUILTIN_REWARDS"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command in readme
