"""Tests for protocol.config: shipped configs, defaults, TOML round trip, overrides, errors, derived sizes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from protocol.config import Config, load_config, parse_override, to_toml

REPO = Path(__file__).parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def test_configs_dir_is_not_empty() -> None:
    assert CONFIGS, f"no configs/*.toml under {REPO}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)

    # Everything the file sets is what the config holds (no key silently ignored).
    def walk(prefix: list[str], table: dict) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk([*prefix, key], value)
            else:
                node = cfg
                for k in [*prefix, key]:
                    node = getattr(node, k)
                assert node == value, ".".join([*prefix, key])

    walk([], tomllib.loads(path.read_text()))
    assert load_config(path, [f"run.dir={path.stem}-copy"]).run.dir == f"{path.stem}-copy"


def test_defaults_load_without_a_file() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.max_staleness == 2 and cfg.selector.rule == "max_variance" and cfg.learner.loss.type == "grpo_is"


def test_tiny_toml_is_the_default_run() -> None:
    """config.py's docstring: configs/tiny.toml is the default run."""
    assert load_config(REPO / "configs" / "tiny.toml").model_dump() == load_config().model_dump()


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([], id="defaults"),
        pytest.param(
            [
                "learner.loss.type=tis",
                "max_staleness=0",
                "run.dir=runs/x y",
                "learner.lr=1e-3",
                "selector.rule=all",
                "net.bind_host=0.0.0.0",
                "rollout.engine.gpu_memory_utilization=0.9",
                "run.resume=false",
                "model.path=/tmp/m",
                "model.init=pretrained",
            ],
            id="overridden",
        ),
        pytest.param(
            [
                'run.dir="C:\\\\runs\\\\quote \\"q\\""',
                "rollout.heartbeat_s=1e-05",
                "learner.grad_clip=0",
                "selector.peer_timeout_s=1e300",
            ],
            id="escapes-and-odd-floats",
        ),
    ],
)
def test_to_toml_round_trips(tmp_path: Path, overrides: list[str]) -> None:
    cfg = load_config(overrides=overrides)
    text = to_toml(cfg)
    tomllib.loads(text)  # valid TOML
    path = tmp_path / "config.toml"
    path.write_text(text)
    again = load_config(path)
    assert again.model_dump() == cfg.model_dump()
    assert to_toml(again) == text


def test_to_toml_sections() -> None:
    text = to_toml(load_config())
    assert text.startswith("max_staleness = 2\n")
    for section in (
        "run",
        "model",
        "model.tiny",
        "task",
        "eval",
        "rollout",
        "rollout.engine",
        "selector",
        "learner",
        "learner.loss",
        "net",
    ):
        assert f"\n[{section}]\n" in text


@pytest.mark.parametrize("value", ['"a\\nb"', '"a\\u0001b"', '"a\\u007fb"'])
def test_to_toml_round_trips_control_characters(tmp_path: Path, value: str) -> None:
    cfg = load_config(overrides=[f"run.dir={value}"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path).run.dir == cfg.run.dir


# --- overrides ---


def test_nested_override() -> None:
    cfg = load_config(overrides=["learner.loss.type=tis", "learner.loss.tis_cap=3"])
    assert cfg.learner.loss.type == "tis" and cfg.learner.loss.tis_cap == 3.0
    assert cfg.learner.lr == Config().learner.lr  # siblings keep their defaults


def test_top_level_override() -> None:
    assert load_config(overrides=["max_staleness=0"]).max_staleness == 0


def test_override_wins_over_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("max_staleness = 5\n[learner]\nlr = 0.1\n[learner.loss]\ntype = 'm2po'\n")
    cfg = load_config(path, ["learner.lr=1e-3", "learner.loss.clip_high=0.3"])
    assert cfg.max_staleness == 5
    assert cfg.learner.lr == 1e-3 and cfg.learner.loss.type == "m2po" and cfg.learner.loss.clip_high == 0.3
    # The last override of a key wins.
    assert load_config(path, ["max_staleness=1", "max_staleness=3"]).max_staleness == 3


def test_override_values_are_typed_as_toml() -> None:
    assert parse_override("learner.lr=1e-3") == (["learner", "lr"], 1e-3)
    assert isinstance(parse_override("learner.lr=1e-3")[1], float)
    assert parse_override("max_staleness=0") == (["max_staleness"], 0)
    assert parse_override("run.resume=false") == (["run", "resume"], False)
    assert parse_override('run.dir="runs/q"') == (["run", "dir"], "runs/q")
    assert parse_override("run.dir=runs/x") == (["run", "dir"], "runs/x")  # not TOML: taken as a string
    assert parse_override("net.bind_host=0.0.0.0") == (["net", "bind_host"], "0.0.0.0")
    assert parse_override("a=b=c") == (["a"], "b=c")
    assert parse_override(" learner.lr =1e-3") == (["learner", "lr"], 1e-3)

    cfg = load_config(overrides=["learner.lr=1e-3", "run.dir=runs/x", "run.seed=7"])
    assert cfg.learner.lr == 1e-3 and type(cfg.learner.lr) is float
    assert cfg.run.dir == "runs/x"
    assert cfg.run.seed == 7


def test_int_override_for_float_field_and_float_for_int_field() -> None:
    assert load_config(overrides=["learner.lr=1"]).learner.lr == 1.0
    with pytest.raises(ValueError, match="max_staleness"):
        load_config(overrides=["max_staleness=1.5"])


# --- errors ---


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("bogus=1", "bogus"),
        ("learner.bogus=1", "learner.bogus"),
        ("learner.loss.bogus_cap=1", "learner.loss.bogus_cap"),
        ("nosection.key=1", "nosection"),
    ],
)
def test_unknown_key(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config(overrides=[override])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[selector]\nrule = 'all'\nkepe = 3\n")
    with pytest.raises(ValueError, match="kepe") as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("max_staleness=-1", "max_staleness"),
        ("learner.lr=0", "lr"),
        ("task.length=33", "length"),
        ("net.group_port=70000", "group_port"),
        ("learner.loss.clip_low=1.0", "clip_low"),
        ("rollout.engine.gpu_memory_utilization=1.5", "gpu_memory_utilization"),
    ],
)
def test_out_of_range(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key) as info:
        load_config(overrides=[override])
    assert override.split("=")[1] in str(info.value)  # the offending value is shown


def test_wrong_literal_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="rule") as info:
        load_config(overrides=["selector.rule=bogus"])
    msg = str(info.value)
    assert "bogus" in msg
    for allowed in ("max_variance", "max_reward", "random", "all"):
        assert allowed in msg


def test_keep_larger_than_group_size() -> None:
    with pytest.raises(ValueError) as info:
        load_config(overrides=["selector.keep=20", "rollout.group_size=16"])
    msg = str(info.value)
    assert "selector.keep=20" in msg and "rollout.group_size=16" in msg
    # rule=all ignores keep, so the same numbers are fine there.
    assert load_config(overrides=["selector.keep=20", "selector.rule=all"]).kept_per_group == 16


def test_other_cross_checks() -> None:
    with pytest.raises(ValueError, match="learner.nproc"):
        load_config(overrides=["learner.nproc=64", "learner.groups_per_step=1"])
    with pytest.raises(ValueError, match="model.path"):
        load_config(overrides=["model.init=pretrained"])


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["net.batch_port=5555"], ("net.group_port", "net.batch_port")),
        (["net.weights_port=5557"], ("net.announce_port", "net.weights_port")),
        (["net.announce_port=5556"], ("net.batch_port", "net.announce_port")),
        (
            ["net.group_port=7000", "net.weights_port=7000", "net.learner_host=localhost"],
            ("net.group_port", "net.weights_port"),
        ),
    ],
)
def test_two_links_on_one_port_are_rejected_naming_both_keys(overrides: list[str], keys: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match=f"{keys[0]} and {keys[1]} are both") as info:
        load_config(overrides=overrides)
    assert "docs/CONFIG.md" in str(info.value)


def test_selector_and_learner_on_two_machines_may_use_the_same_port_numbers() -> None:
    apart = [
        "net.selector_host=10.0.0.5",
        "net.learner_host=10.0.0.6",
        "net.announce_port=5555",
        "net.weights_port=5556",
    ]
    net = load_config(overrides=apart).net
    assert (net.group_port, net.batch_port) == (net.announce_port, net.weights_port)
    with pytest.raises(ValueError, match="net.group_port and net.batch_port are both 5555"):  # one machine still
        load_config(overrides=[*apart, "net.batch_port=5555"])


@pytest.mark.parametrize("override", ["max_staleness", "learner.lr", "=3", ""])
def test_override_without_equals(override: str) -> None:
    with pytest.raises(ValueError, match="key=value"):
        load_config(overrides=[override])


def test_override_into_a_value_that_is_not_a_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_staleness is not a section"):
        load_config(overrides=["max_staleness=1", "max_staleness.x=1"])
    path = tmp_path / "run.toml"
    path.write_text("[run]\ndir = 'runs/a'\n")
    with pytest.raises(ValueError, match="dir is not a section"):
        load_config(path, ["run.dir.x=1"])
    # A fresh dotted key under a scalar key that is not set yet is a schema error instead.
    with pytest.raises(ValueError, match="max_staleness"):
        load_config(overrides=["max_staleness.x=1"])


def test_override_a_section_with_a_value() -> None:
    with pytest.raises(ValueError, match="learner"):
        load_config(overrides=["learner=3"])


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ValueError, match="does not exist") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[learner\nlr = 1\n")
    with pytest.raises(ValueError, match="not valid TOML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_errors_are_value_errors_without_pydantic_chaining() -> None:
    with pytest.raises(ValueError) as info:
        load_config(overrides=["max_staleness=-1"])
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- derived sizes ---


def test_derived_sizes_max_variance() -> None:
    cfg = load_config(
        overrides=[
            "selector.rule=max_variance",
            "selector.keep=4",
            "rollout.group_size=16",
            "learner.groups_per_step=8",
        ]
    )
    assert cfg.kept_per_group == 4
    assert cfg.samples_per_step == 32


def test_derived_sizes_all() -> None:
    cfg = load_config(
        overrides=["selector.rule=all", "selector.keep=4", "rollout.group_size=16", "learner.groups_per_step=8"]
    )
    assert cfg.kept_per_group == 16
    assert cfg.samples_per_step == 128


def test_max_new_tokens() -> None:
    assert load_config().max_new_tokens == Config().task.length + 1 == 4
    assert load_config(overrides=["task.length=10"]).max_new_tokens == 11
    assert load_config(overrides=["task.length=10", "rollout.max_new_tokens=5"]).max_new_tokens == 5


def test_dataset_max_new_tokens_default() -> None:
    cfg = load_config(overrides=["task.dataset=d.jsonl", "task.reward=math_answer"])
    assert cfg.max_new_tokens == 256


# --- the task section ---


def test_dataset_implies_type_dataset() -> None:
    cfg = load_config(overrides=["task.dataset=d.jsonl", "task.reward=mymod:f"])
    assert cfg.task.type == "dataset" and cfg.task.rewards == ["mymod:f"] and cfg.task.weights == [1.0]


def test_builtin_task_reward_defaults_to_its_verifier() -> None:
    assert load_config().task.rewards == ["copy"]
    assert load_config(overrides=["task.type=reverse"]).task.rewards == ["reverse"]


def test_several_rewards_with_weights_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=[
            'task.reward=["math_answer", "m:fmt"]',
            "task.reward_weights=[1.0, 0.25]",
            "task.dataset=d.jsonl",
            'task.stop=["\\n\\n"]',
        ]
    )
    assert cfg.task.rewards == ["math_answer", "m:fmt"] and cfg.task.weights == [1.0, 0.25]
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["task.type=copy", "task.dataset=d.jsonl"], "task.type='dataset'"),
        (["task.type=dataset"], "task.dataset="),
        (["task.dataset=d.jsonl"], "task.reward"),
        (['task.reward=["a:b", "c:d"]', "task.reward_weights=[1.0]", "task.dataset=d.jsonl"], "one weight per"),
        (["task.eval_fraction=0.1"], "built-in tasks"),
        (
            ["task.dataset=d.jsonl", "task.reward=exact_match", "task.eval_fraction=0.1", "task.eval_dataset=e.jsonl"],
            "not both",
        ),
    ],
)
def test_task_errors_name_the_key_and_fix(overrides: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match="task") as e:
        load_config(overrides=overrides)
    assert needle in str(e.value)


def test_model_dir_and_summary() -> None:
    cfg = load_config(overrides=["run.dir=runs/abc"])
    assert cfg.model_dir == Path("runs/abc/model")
    assert load_config(overrides=["model.path=/m"]).model_dir == Path("/m")
    s = load_config().summary()
    assert "K=2" in s and "m=4" in s and "samples/step=32" in s


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.max_staleness = 3  # type: ignore[misc]


def test_the_config_bounds_turns_as_the_protocol_does():
    from protocol import config, messages

    assert config.MAX_TURNS == messages.MAX_TURNS
    cfg = load_config(None, ["task.type=product", "task.environment=calc", "task.max_turns=3"])
    assert (cfg.max_turns, cfg.max_completion_tokens) == (3, 3 * cfg.max_new_tokens)
    assert (load_config(None, []).max_turns, load_config(None, []).max_completion_tokens) == (1, 4)


def test_the_per_peer_group_budget_defaults_to_the_runs_pacing() -> None:
    """'auto': a paced server delivers groups without a grant only after a lease expired or a selector
    restart (a call's worth), so 16 a second is plenty; an unpaced one makes all its groups without one
    (the tiny model's ~290 a second), so 1000. A number is taken as it is; 0 turns the bound off."""

    def rate(*overrides: str) -> float:
        return load_config(None, list(overrides)).peer_groups_per_s

    assert rate() == 16.0 and rate("rollout.pacing=credits") == 16.0
    assert rate("rollout.pacing=free") == 1000.0
    assert rate("rollout.pacing=free", "selector.peer_groups_per_s=50") == 50.0
    assert rate("selector.peer_groups_per_s=0") == 0.0
