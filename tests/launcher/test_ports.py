"""Which ports `podsrl run` uses: free ones for the ports the user left unset, the user's own otherwise."""

from __future__ import annotations

from launcher.ports import PORT_KEYS, assign_ports, describe, free_ports
from protocol.config import load_config


def ports(cfg) -> list[int]:
    return [getattr(cfg.net, k) for k in PORT_KEYS]


def test_two_launches_get_distinct_ports_that_no_later_bind_is_given():
    first, picked = assign_ports(load_config())
    second, _ = assign_ports(load_config())
    assert picked == list(PORT_KEYS) and len(set(ports(first) + ports(second))) == 8
    # Reserved: a third launcher picking while the first run's processes start never gets one of them.
    later = [p for _ in range(20) for p in free_ports(250)]
    assert not set(later) & set(ports(first) + ports(second))


def test_ports_set_in_the_file_or_by_an_override_are_kept(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text("[net]\ngroup_port = 5555\n")  # the default value, but set: kept
    cfg, picked = assign_ports(load_config(run, ["net.weights_port=6001"]))
    assert (cfg.net.group_port, cfg.net.weights_port) == (5555, 6001)
    assert picked == ["batch_port", "announce_port"]
    assert len(set(ports(cfg))) == 4 and {cfg.net.batch_port, cfg.net.announce_port}.isdisjoint({5555, 6001})
    assert describe(cfg.net, picked) == (
        f"ports: group 5555, batch {cfg.net.batch_port} (free), announce {cfg.net.announce_port} (free), weights 6001"
    )


def test_the_configured_ports_stand_when_processes_start_elsewhere():
    for overrides in (["rollout.servers=0"], ["net.bind_host=0.0.0.0"], ["net.selector_host=10.0.0.5"]):
        cfg = load_config(None, overrides)
        assert assign_ports(cfg) == (cfg, []) and ports(cfg) == [5555, 5556, 5557, 5558]
    cfg = load_config(None, [f"net.{k}={6000 + i}" for i, k in enumerate(PORT_KEYS)])
    assert assign_ports(cfg) == (cfg, [])


def test_a_saved_run_config_keeps_its_ports(tmp_path):
    from protocol.config import to_toml

    cfg, _ = assign_ports(load_config())
    (tmp_path / "config.toml").write_text(to_toml(cfg))  # what the launcher writes and its processes read
    again = load_config(tmp_path / "config.toml")
    assert ports(again) == ports(cfg) and assign_ports(again) == (again, [])
