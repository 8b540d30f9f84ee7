"""The task layer end to end: rendering and tokenizing prompts with a real tokenizer, Task, validate_task."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from protocol.config import Config, TaskConfig, load_config
from rollout_server.tasks import Prompt, Task, TaskError, task_name, validate_task
from rollout_server.tasks.render import prompt_lengths, render, stop_ids, tokenize

ALPHABET = string.ascii_letters + string.digits + " :=?!+.,#{}()\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny model's character-level tokenizer (BOS prepended, EOS, pad, a chat template), saved and reloaded."""
    from transformers import AutoTokenizer

    from launcher.tiny import build_char_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_char_tokenizer(ALPHABET, path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def plain_tokenizer(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The same tokenizer without a chat template (a base model's)."""
    monkeypatch.setattr(tokenizer, "chat_template", None)
    return tokenizer


@pytest.fixture
def tasks() -> Iterator[list[Task]]:
    """Tasks made in a test are closed after it (each holds a reward worker process)."""
    made: list[Task] = []
    yield made
    for t in made:
        t.close()


@pytest.fixture
def no_reward_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that only draw prompts: Task without a reward worker process (it costs a spawn)."""

    class NoWorker:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

        def close(self) -> None: ...

    monkeypatch.setattr("rollout_server.tasks.RewardWorker", NoWorker)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sums(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"{i}+{i}=?", "answer": str(2 * i)} for i in range(n)]


def dataset_config(path: Path, *overrides: str) -> Config:
    return load_config(overrides=[f"task.dataset={path}", "task.reward=exact_match", *overrides])


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- render / tokenize / stop_ids


def test_template_formats_the_row_columns(tokenizer):
    cfg = TaskConfig(dataset="x.jsonl", reward="exact_match", prompt_field="q", template="Q: {q} ({unit})\nA:")
    row = {"q": "how far", "unit": "km", "answer": "3"}
    assert render(row, cfg, tokenizer) == ("Q: how far (km)\nA:", False)
    assert render({"prompt": "abc="}, TaskConfig(), tokenizer) == ("abc=", False)  # the default is the prompt itself


@pytest.mark.parametrize(
    "template",
    [
        "{prompt} {hint}",  # KeyError
        "{prompt} {}",  # IndexError
        "{prompt",  # ValueError
        "{prompt:d}",  # ValueError
        "{prompt[0]}{prompt.x}",  # AttributeError
        "{prompt[x]}",  # TypeError
    ],
)
def test_template_a_row_cannot_fill_names_task_template(tokenizer, template):
    cfg = TaskConfig(dataset="x.jsonl", reward="exact_match", template=template)
    with pytest.raises(TaskError, match=r"^task\.template=") as e:
        render({"prompt": "abc", "answer": "1"}, cfg, tokenizer)
    assert "answer" in str(e.value)  # the row's columns are listed


def test_plain_prompt_tokenizes_with_one_bos(tokenizer):
    text, chat = render({"prompt": "ab="}, TaskConfig(), tokenizer)
    ids = tokenize(text, chat, tokenizer)
    assert ids.dtype == np.int32
    assert ids.tolist() == [tokenizer.bos_token_id, *ids_of(tokenizer, "ab=")]


def test_chat_template_renders_user_turn_and_generation_prompt(tokenizer):
    cfg = TaskConfig(dataset="x.jsonl", reward="exact_match", chat_template=True, template="Q {prompt}")
    text, chat = render({"prompt": "hi"}, cfg, tokenizer)
    assert (text, chat) == ("user: Q hi\nassistant: ", True)
    ids = tokenize(text, chat, tokenizer).tolist()
    assert ids == ids_of(tokenizer, text)  # the template's own specials only: this template has no BOS
    assert tokenizer.bos_token_id not in ids


def test_chat_template_with_bos_gives_exactly_one_bos(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", "{{ bos_token }}" + tokenizer.chat_template)
    cfg = TaskConfig(dataset="x.jsonl", reward="exact_match", chat_template=True)
    text, chat = render({"prompt": "hi"}, cfg, tokenizer)
    assert text == "<bos>user: hi\nassistant: " and chat
    ids = tokenize(text, chat, tokenizer).tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenize(text, False, tokenizer).tolist().count(tokenizer.bos_token_id) == 2  # what chat=True avoids


def test_system_prompt_is_prepended_to_chat_prompts(tokenizer):
    cfg = TaskConfig(dataset="x.jsonl", reward="exact_match", chat_template=True, system_prompt="Be brief.")
    assert render({"prompt": "hi"}, cfg, tokenizer)[0] == "system: Be brief.\nuser: hi\nassistant: "
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert render({"prompt": messages}, cfg, tokenizer)[0] == (
        "system: Be brief.\nuser: a\nassistant: b\nuser: c\nassistant: "
    )
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "a"}]
    assert render({"prompt": own}, cfg, tokenizer)[0] == "system: Mine.\nuser: a\nassistant: "  # not doubled
    # without the chat template the system prompt does not apply (it is a chat_template setting)
    plain = TaskConfig(dataset="x.jsonl", reward="exact_match", system_prompt="Be brief.")
    assert render({"prompt": "hi"}, plain, tokenizer) == ("hi", False)


def test_chat_message_prompts_always_use_the_chat_template(tokenizer):
    cfg = TaskConfig(dataset="x.jsonl", reward="exact_match", template="ignored {prompt}")
    text, chat = render({"prompt": [{"role": "user", "content": "x"}]}, cfg, tokenizer)
    assert (text, chat) == ("user: x\nassistant: ", True)


def test_chat_prompts_without_a_chat_template_name_the_fix(plain_tokenizer):
    chat_cfg = TaskConfig(dataset="x.jsonl", reward="exact_match", chat_template=True)
    with pytest.raises(TaskError, match="no chat template") as e:
        render({"prompt": "hi"}, chat_cfg, plain_tokenizer)
    assert "task.chat_template=false" in str(e.value)
    with pytest.raises(TaskError, match="no chat template"):
        render({"prompt": [{"role": "user", "content": "hi"}]}, TaskConfig(), plain_tokenizer)
    assert render({"prompt": "hi"}, TaskConfig(), plain_tokenizer) == ("hi", False)  # string prompts still work


def test_stop_ids_union_tokenizer_eos_and_model_config(tokenizer):
    eos = tokenizer.eos_token_id
    assert stop_ids(tokenizer, {}) == (eos,)
    assert stop_ids(tokenizer, {"eos_token_id": eos}) == (eos,)
    assert stop_ids(tokenizer, {"eos_token_id": 40}) == tuple(sorted({eos, 40}))
    assert stop_ids(tokenizer, {"eos_token_id": [41, eos, 40]}) == tuple(sorted({eos, 40, 41}))
    assert stop_ids(tokenizer, {"eos_token_id": None}) == (eos,)
    no_eos = SimpleNamespace(eos_token_id=None)
    assert stop_ids(no_eos, {"eos_token_id": [7, 3]}) == (3, 7)
    with pytest.raises(TaskError, match="no EOS token"):
        stop_ids(no_eos, {})


# ---------------------------------------------------------------- Task


def test_task_draws_tokenized_prompts_and_scores_completions(tmp_path, tokenizer, tasks):
    path = write_jsonl(tmp_path / "sums.jsonl", sums(6))
    task = Task(dataset_config(path), tokenizer, {"eos_token_id": tokenizer.eos_token_id}, seed=0)
    tasks.append(task)
    assert task.name == "sums" and task.stop_ids == (tokenizer.eos_token_id,)
    assert task.pad_id == tokenizer.pad_token_id
    prompts = task.next_prompts(3)
    assert len(prompts) == 3 and all(isinstance(p, Prompt) for p in prompts)
    for p in prompts:
        assert p.ids.dtype == np.int32 and p.ids[0] == tokenizer.bos_token_id
        assert p.text == p.row["prompt"] and p.ids.tolist()[1:] == ids_of(tokenizer, p.text)
    assert task.source.position()["data/index"] == 3 and task.too_long == 0
    # two completions per prompt (prompt-major): the right answer + EOS, then a wrong one
    eos = tokenizer.eos_token_id
    completions = []
    for p in prompts:
        completions.append(np.array([*ids_of(tokenizer, p.row["answer"]), eos], np.int32))
        completions.append(np.array([*ids_of(tokenizer, p.row["answer"] + "1"), eos], np.int32))
    scores, texts = task.score(prompts, completions, 2)
    assert scores.rewards.tolist() == [1.0, 0.0] * 3
    assert texts == [t for p in prompts for t in (p.row["answer"], p.row["answer"] + "1")]  # no "<eos>"
    assert scores.per_function == {"exact_match": 0.5} and not scores.errors


def test_task_passes_every_column_to_the_reward(tmp_path, tokenizer, tasks):
    plugin = tmp_path / "cols.py"
    plugin.write_text(
        "def f(prompts, completions, answer, extra, **kw):\n"
        "    assert all(isinstance(i, int) for ids in kw['completion_ids'] for i in ids)\n"
        "    return [float(len(p)) + (0.5 if e is None else e) for p, e in zip(prompts, extra)]\n"
    )
    rows: list[dict[str, Any]] = [{"prompt": "abc", "answer": "x", "extra": 10}, {"prompt": "de", "answer": "y"}]
    cfg = dataset_config(write_jsonl(tmp_path / "d.jsonl", rows), f"task.reward={plugin}:f")
    task = Task(cfg, tokenizer, {}, seed=0)
    tasks.append(task)
    prompts = sorted(task.next_prompts(2), key=lambda p: p.row["prompt"])
    scores, _ = task.score(prompts, [np.array([5], np.int32)] * 2, 1)
    assert scores.rewards.tolist() == [13.0, 2.5] and not scores.errors  # a row without the column gets None


def test_overlong_prompts_are_skipped_and_counted(tmp_path, tokenizer, tasks, no_reward_process):
    rows = [*sums(4), {"prompt": "x" * 40, "answer": "0"}]
    cfg = dataset_config(write_jsonl(tmp_path / "d.jsonl", rows), "task.max_prompt_tokens=10")
    task = Task(cfg, tokenizer, {}, seed=3)
    tasks.append(task)
    prompts = task.next_prompts(4)  # exactly one epoch of 5 rows: the long one is met once and skipped
    assert sorted(p.row["prompt"] for p in prompts) == sorted(r["prompt"] for r in sums(4))
    assert task.too_long == 1 and all(p.ids.shape[0] <= 10 for p in prompts)
    assert task.source.position()["data/progress"] == pytest.approx(1.0)


def test_only_overlong_prompts_raise_instead_of_spinning(tmp_path, tokenizer, tasks, no_reward_process):
    cfg = dataset_config(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 20, "answer": "0"}] * 3), "task.max_prompt_tokens=5"
    )
    task = Task(cfg, tokenizer, {}, seed=0)
    tasks.append(task)
    with pytest.raises(TaskError, match=r"longer than task\.max_prompt_tokens=5"):
        task.next_prompts(2)
    assert task.too_long == 200


def test_eval_prompts_hold_out_the_same_rows_on_every_server(tmp_path, tokenizer, tasks):
    path = write_jsonl(tmp_path / "d.jsonl", sums(8))
    cfg = dataset_config(path, "task.eval_fraction=0.25", "run.seed=4")
    a = Task(cfg, tokenizer, {}, seed=0)
    tasks.append(a)
    with pytest.MonkeyPatch.context() as mp:  # the second server only shows its eval rows: no reward process
        mp.setattr("rollout_server.tasks.RewardWorker", lambda *args, **kwargs: SimpleNamespace(close=lambda: None))
        b = Task(cfg, tokenizer, {}, seed=1)
    tasks.append(b)
    held = a.eval_prompts()
    assert len(held) == 2 and a.eval_prompts() is held  # rendered once
    assert [p.row for p in held] == [p.row for p in b.eval_prompts()]
    assert all(p.ids[0] == tokenizer.bos_token_id for p in held)
    trained = {p.row["prompt"] for p in a.next_prompts(6)}
    assert len(trained) == 6 and not trained & {p.row["prompt"] for p in held}
    right = [np.array([*ids_of(tokenizer, p.row["answer"]), tokenizer.eos_token_id], np.int32) for p in held]
    assert a.score(held, right, 1)[0].rewards.tolist() == [1.0, 1.0]


def test_builtin_task_prompts_and_partial_credit(tokenizer, tasks):
    cfg = load_config(overrides=["task.type=reverse", "task.length=3", "task.symbols=5", "eval.prompts=4"])
    task = Task(cfg, tokenizer, {}, seed=0)
    tasks.append(task)
    assert task.name == "reverse" and task_name(cfg.task) == "reverse"
    [p] = task.next_prompts(1)
    body = p.row["prompt"][:-1]
    assert p.ids.tolist() == [tokenizer.bos_token_id, *ids_of(tokenizer, body + "=")]
    full = np.array([*ids_of(tokenizer, body[::-1]), tokenizer.eos_token_id], np.int32)
    scores, texts = task.score([p], [full, full[:2]], 2)
    assert scores.rewards.tolist() == pytest.approx([1.0, 2 / 3]) and texts == [body[::-1], body[::-1][:2]]
    assert len(task.eval_prompts()) == 4


def test_variable_length_copy_fits_max_new_tokens_and_scores_each_row_by_its_own_answer(tokenizer, tasks):
    cfg = load_config(
        overrides=["task.type=copy", "task.min_length=1", "task.length=16", "task.symbols=5", "eval.prompts=64"]
    )
    assert cfg.task.min_length == 1 and cfg.max_new_tokens == 17  # rollout.max_new_tokens=0: longest answer + stop
    task = Task(cfg, tokenizer, {}, seed=0)
    tasks.append(task)
    prompts = task.next_prompts(200)
    eos = tokenizer.eos_token_id
    right = [np.array([*ids_of(tokenizer, p.row["answer"]), eos], np.int32) for p in prompts]
    assert max(len(c) for c in right) == cfg.max_new_tokens  # the longest answer and its stop token fit exactly
    assert min(len(c) for c in right) == 2
    assert all(len(p.ids) == len(p.row["prompt"]) + 1 for p in prompts)  # BOS + one token per character
    # char_match scores each completion against its own row's answer, whatever its length
    half = [c[: len(c) // 2] for c in right]  # the first half of each answer's tokens, no stop token
    scores, texts = task.score(prompts, [c for pair in zip(right, half, strict=True) for c in pair], 2)
    expected = [x for p in prompts for x in (1.0, (len(p.row["answer"]) + 1) // 2 / len(p.row["answer"]))]
    assert scores.rewards.tolist() == pytest.approx(expected) and not scores.errors
    assert texts[::2] == [p.row["answer"] for p in prompts]
    assert len({len(p.row["answer"]) for p in task.eval_prompts()}) > 8  # eval prompts vary in length too
    assert all(len(p.row["answer"]) + 1 <= cfg.max_new_tokens for p in task.eval_prompts())
    # an explicit rollout.max_new_tokens still wins; a min_length above length is refused with the fix
    assert (
        load_config(overrides=["task.min_length=1", "task.length=16", "rollout.max_new_tokens=40"]).max_new_tokens == 40
    )
    with pytest.raises(ValueError, match=r"task\.min_length=9 is above task\.length=8.*task\.min_length <= "):
        load_config(overrides=["task.min_length=9", "task.length=8"])


# ---------------------------------------------------------------- validate_task


def test_validate_task_summarises_a_good_dataset(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sums.jsonl", sums(10))
    summary = validate_task(dataset_config(path, "task.eval_fraction=0.2"), tokenizer)
    assert summary == (f"task {path}: 8 training rows, 2 eval rows, columns ['answer']; rewards exact_match x1")
    assert validate_task(load_config()) == "task copy (length 3, 12 symbols); rewards copy x1"
    two = validate_task(
        dataset_config(path, 'task.reward=["exact_match", "math_answer"]', "task.reward_weights=[1.0, 0.5]")
    )
    assert two.endswith("rewards exact_match x1, math_answer x0.5")


def test_validate_task_names_the_row_a_template_cannot_fill(tmp_path):
    rows = [{"prompt": "a", "answer": "1", "hint": "h"}, {"prompt": "b", "answer": "2"}]
    cfg = dataset_config(write_jsonl(tmp_path / "d.jsonl", rows), "task.template={prompt} ({hint})")
    with pytest.raises(
        TaskError,
        match=r"task\.template='\{prompt\} \(\{hint\}\)' cannot be filled from task\.dataset=.* line 2 "
        r"\(KeyError: 'hint'\)",
    ):
        validate_task(cfg)


@pytest.mark.parametrize("template", ["{prompt.size}", "{answer[0]}"])
def test_validate_task_turns_any_template_error_into_task_error(tmp_path, template):
    cfg = dataset_config(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": 1}]), f"task.template={template}")
    with pytest.raises(TaskError, match=r"cannot be filled from .* line 1 \((AttributeError|TypeError)"):
        validate_task(cfg)


def test_validate_task_rejects_a_reward_that_does_not_import_or_does_not_fit(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", sums(3))
    broken = tmp_path / "broken.py"
    broken.write_text("import podsrl_no_such_dependency\n\ndef f(prompts, completions): ...\n")
    with pytest.raises(TaskError, match=r"importing .*broken\.py failed"):
        validate_task(dataset_config(path, f"task.reward={broken}:f"))
    with pytest.raises(TaskError, match=r"\['numbers', 'target'\]"):  # countdown needs columns this data lacks
        validate_task(dataset_config(path, "task.reward=countdown"))
    with pytest.raises(TaskError, match="neither a built-in"):
        validate_task(dataset_config(path, "task.reward=not_a_reward"))


def test_validate_task_renders_with_the_tokenizer(tmp_path, plain_tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}]
    cfg = dataset_config(write_jsonl(tmp_path / "d.jsonl", rows))
    assert "1 training rows" in validate_task(cfg)  # no tokenizer: rendering is not checked
    with pytest.raises(TaskError, match="no chat template"):
        validate_task(cfg, plain_tokenizer)


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_lengths_are_the_lengths_a_rollout_server_tokenizes(tmp_path, tokenizer, tasks, no_reward_process, chat):
    messages = [
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "ok?"},
    ]
    rows = [*sums(5), {"prompt": messages, "answer": "x"}, {"prompt": "", "answer": ""}]
    cfg = dataset_config(write_jsonl(tmp_path / "d.jsonl", rows), f"task.chat_template={str(chat).lower()}")
    task = Task(cfg, tokenizer, {}, seed=0)
    tasks.append(task)
    expected = [tokenize(*render(r, cfg.task, tokenizer), tokenizer).shape[0] for r in rows]
    assert prompt_lengths(rows, cfg.task, tokenizer, batch=3) == expected  # batches split a mix of chat and plain
    assert [task.prompt(r) is None for r in rows] == [n > cfg.task.max_prompt_tokens or n == 0 for n in expected]


def test_validate_task_names_the_prompts_too_long_for_task_max_prompt_tokens(tmp_path, tokenizer):
    rows = [*sums(3), {"prompt": "x" * 40, "answer": "0"}, *sums(2), {"prompt": "y" * 50, "answer": "0"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    limit = max(
        tokenize(*render(r, TaskConfig(dataset=str(path), reward="exact_match"), tokenizer), tokenizer).shape[0]
        for r in sums(5)
    )
    cfg = dataset_config(path, f"task.max_prompt_tokens={limit}")
    with pytest.raises(TaskError) as info:
        validate_task(cfg, tokenizer)
    msg = str(info.value)
    x, y = (tokenize(c * n, False, tokenizer).shape[0] for c, n in (("x", 40), ("y", 50)))
    assert f"task.dataset={str(path)!r}: 2 of 7 prompts are longer than task.max_prompt_tokens={limit}" in msg
    assert f"line 4 ({x} tokens), line 7 ({y} tokens)." in msg  # 1-based line numbers, as an editor shows them
    assert "Raise task.max_prompt_tokens, or filter those rows out of the dataset" in msg
    assert "7 training rows" in validate_task(dataset_config(path, f"task.max_prompt_tokens={y}"), tokenizer)
    assert "7 training rows" in validate_task(cfg)  # no tokenizer: lengths are not checked
    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "x" * 40, "answer": "0"}] * 8)
    with pytest.raises(TaskError, match=r"8 of 8 prompts .* line 1 .* line 5 \(\d+ tokens\), \.\.\.\. Raise"):
        validate_task(dataset_config(many, f"task.max_prompt_tokens={limit}"), tokenizer)
