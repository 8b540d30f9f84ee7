"""Built-in tasks: exact verifiers."""

import numpy as np
import pytest

from protocol.config import BOS_ID, EOS_ID, SEP_ID, TaskConfig
from rollout_server.tasks import build_task


@pytest.mark.parametrize("kind", ["copy", "reverse"])
def test_prompt_format_and_exact_scores(kind):
    task = build_task(TaskConfig(type=kind, length=3, symbols=5))
    prompt = task.sample_prompt(np.random.default_rng(0))
    assert prompt.dtype == np.int32 and prompt[0] == BOS_ID and prompt[-1] == SEP_ID and len(prompt) == 5
    assert ((prompt[1:-1] >= 4) & (prompt[1:-1] < 9)).all()
    answer = prompt[1:-1] if kind == "copy" else prompt[1:-1][::-1]
    assert task.score(prompt, np.append(answer, EOS_ID)) == 1.0
    assert task.score(prompt, answer[:2]) == pytest.approx(2 / 3)  # truncated answer: partial credit
    wrong = answer.copy()
    wrong[0] = 4 if wrong[0] != 4 else 5
    assert task.score(prompt, wrong) == pytest.approx(2 / 3)
    assert task.score(prompt, np.array([EOS_ID], np.int32)) == 0.0


def test_random_policy_scores_about_one_over_symbols():
    task = build_task(TaskConfig(type="copy", length=3, symbols=12))
    rng = np.random.default_rng(1)
    scores = [task.score(task.sample_prompt(rng), rng.integers(4, 16, 3).astype(np.int32)) for _ in range(3000)]
    assert abs(np.mean(scores) - 1 / 12) < 0.02
