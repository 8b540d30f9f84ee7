"""Start-up checks: each bad input stops the run before any process starts, naming the key and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, child_env

from launcher.preflight import PreflightError, preflight
from launcher.tiny import build_tiny_model
from protocol.config import load_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "model"
    build_tiny_model(load_config(), path, alphabet="abc= ")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{c}=", "answer": c}) + "\n" for c in "abcab"))
    return path


def check(model: Path, data: Path, *overrides: str) -> str:
    return preflight(
        load_config(
            overrides=[
                f"model.path={model}",
                "model.init=pretrained",
                f"task.dataset={data}",
                "task.reward=exact_match",
                *overrides,
            ]
        )
    )


def test_a_good_run_reports_model_and_task(model_dir: Path, data: Path) -> None:
    report = check(model_dir, data)
    assert "vocabulary" in report and "5 training rows" in report and "exact_match x1" in report


def test_tiny_model_is_built_from_the_dataset_characters(tmp_path: Path, data: Path) -> None:
    report = preflight(
        load_config(overrides=[f"run.dir={tmp_path / 'run'}", f"task.dataset={data}", "task.reward=exact_match"])
    )
    assert "built the tiny model" in report
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert tok.decode(tok("ab=c")["input_ids"], skip_special_tokens=True) == "ab=c"


def test_reward_plugin_that_does_not_import(model_dir: Path, data: Path) -> None:
    with pytest.raises(PreflightError, match=r"task.reward='nosuchmodule_xyz:f'.*importing nosuchmodule_xyz failed"):
        check(model_dir, data, "task.reward=nosuchmodule_xyz:f")


def test_reward_plugin_with_the_wrong_signature(model_dir: Path, data: Path, tmp_path: Path) -> None:
    plugin = tmp_path / "bad_sig.py"
    plugin.write_text("def score(texts, gold):\n    return [0.0] * len(texts)\n")
    with pytest.raises(PreflightError, match=r"needs \['texts', 'gold'\].*f\(prompts, completions, \*\*columns\)"):
        check(model_dir, data, f"task.reward={plugin}:score")


def test_reward_plugin_missing_function(model_dir: Path, data: Path, tmp_path: Path) -> None:
    plugin = tmp_path / "empty_mod.py"
    plugin.write_text("x = 1\n")
    with pytest.raises(PreflightError, match="has no function 'score'"):
        check(model_dir, data, f"task.reward={plugin}:score")


def test_reward_values_are_tried_on_rows_within_the_selectors_bound(model_dir: Path, data: Path) -> None:
    # exact_match on the rows' answers scores 1.0, in process (a built-in): the report shows it
    assert "rewards on 4 trial rows: exact_match 1" in check(model_dir, data)
    with pytest.raises(
        PreflightError,
        match=r"reward function 'exact_match' \(out_of_range: returned 1.0, outside \+-selector.max_abs_reward=0.5\)",
    ):
        check(model_dir, data, "selector.max_abs_reward=0.5")


@pytest.mark.parametrize(
    ("value", "shown"), [("1e38", "out_of_range: returned 1e+38"), ("-inf", "non_finite: returned -inf")]
)
def test_a_reward_plugin_the_selector_would_reject_fails_naming_it(
    model_dir: Path, data: Path, tmp_path: Path, value: str, shown: str
) -> None:
    # issue 19: a 1e38 reward got every group rejected and `podsrl check` passed; the plugin runs in the worker
    plugin = tmp_path / "huge.py"
    plugin.write_text(f"def score(prompts, completions, **kw):\n    return [float('{value}')] * len(completions)\n")
    with pytest.raises(PreflightError, match="reward function 'score'") as e:
        check(model_dir, data, f"task.reward={plugin}:score")
    assert (
        shown in str(e.value) and "selector.max_abs_reward=10000" in str(e.value) and "Fix the function" in str(e.value)
    )


def test_an_in_range_plugin_passes_and_the_bound_is_the_fix(model_dir: Path, data: Path, tmp_path: Path) -> None:
    plugin = tmp_path / "scaled.py"
    plugin.write_text("def score(prompts, completions, answer, **kw):\n    return [1e5 * len(a) for a in answer]\n")
    with pytest.raises(PreflightError, match=r"returned 100000.0, outside \+-selector.max_abs_reward=10000"):
        check(model_dir, data, f"task.reward={plugin}:score")
    assert "rewards on 4 trial rows: score 1e+05" in check(
        model_dir, data, f"task.reward={plugin}:score", "selector.max_abs_reward=1e6"
    )


def test_missing_dataset(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match=r"task.dataset=.*does not exist"):
        check(model_dir, tmp_path / "nope.jsonl")


def test_row_without_the_prompt_field_is_named(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a="}\n{"prompt": "b="}\n{"question": "c="}\n')
    with pytest.raises(PreflightError, match=r"line 3 has no 'prompt' column.*task.prompt_field"):
        check(model_dir, path)


def test_template_naming_a_missing_column(model_dir: Path, data: Path) -> None:
    with pytest.raises(
        PreflightError, match=r"task.template='\{prompt\} \{context\}' cannot be filled from task.dataset=.* line 1"
    ):
        check(model_dir, data, 'task.template="{prompt} {context}"')


def test_a_prompt_too_long_for_task_max_prompt_tokens_is_named_by_its_line(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    long = json.dumps({"prompt": "ab" * 5000 + "=", "answer": "a"})
    path.write_text('{"prompt": "a=", "answer": "a"}\n\n' + long + '\n{"prompt": "b=", "answer": "b"}\n')
    with pytest.raises(
        PreflightError, match=r"1 of 3 prompts are longer than task.max_prompt_tokens=1024 .* line 3 \("
    ):
        check(model_dir, path)
    assert "3 training rows" in check(model_dir, path, "task.max_prompt_tokens=20000")


def test_model_dir_without_tokenizer(model_dir: Path, data: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, bare / f.name)
    with pytest.raises(PreflightError, match=r"has no tokenizer files.*tokenizer.save_pretrained"):
        check(bare, data)


def test_model_dir_without_config(data: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="has no config.json"):
        check(tmp_path / "empty", data)


def test_chat_template_requested_from_a_tokenizer_without_one(model_dir: Path, data: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert "task" in check(plain, data)  # plain prompts are fine
    with pytest.raises(PreflightError, match="has no chat template"):
        check(plain, data, "task.chat_template=true")


def test_tokenizer_larger_than_the_model_vocabulary(model_dir: Path, data: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    shutil.copytree(model_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 4
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError, match="vocab_size is 4"):
        check(small, data)


def test_podsrl_run_stops_before_starting_any_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "run",
            f"run.dir={run_dir}",
            f"task.dataset={tmp_path / 'missing.jsonl'}",
            "task.reward=exact_match",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "task.dataset=" in res.stderr and "does not exist" in res.stderr
    assert not (run_dir / "pids.json").exists()
    # no role started: at most the fork server's own log (it imports torch while the checks run)
    assert {p.name for p in (run_dir / "logs").glob("*")} <= {"forkserver.log"}


def test_a_run_that_leaves_loopback_without_keys_stops_before_any_process(model_dir: Path, data: Path) -> None:
    with pytest.raises(PreflightError, match="podsrl keys"):
        check(model_dir, data, "net.bind_host='0.0.0.0'")


def test_lora_target_modules_the_model_lacks_are_named_with_the_ones_it_has(model_dir: Path, data: Path) -> None:
    assert "LoRA rank 8" in check(model_dir, data, "learner.lora.rank=8")
    with pytest.raises(PreflightError, match=r"learner.lora.target_modules.*\['c_attn'\].*q_proj"):
        check(model_dir, data, "learner.lora.rank=8", "learner.lora.target_modules=['q_proj','c_attn']")
