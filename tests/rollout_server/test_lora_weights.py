"""LoRA versions on the weights link: an adapter travels like any version (full, then deltas, digests and
the announced manifest), and a hostile or broken adapter is rejected by the rollout server's weights
client before any engine sees it. A real publisher, real sockets, the real weights client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import zmq
from lora_helpers import adapter_model, adapter_version, randomize
from test_weight_transfer import (  # noqa: F401 (fixtures)
    FETCH_S,
    Aio,
    Publishers,
    aio,
    net,
    publish_packed,
    publishers,
    zctx,
)

from launcher.tiny import build_tiny_model
from learner.model import load_model
from learner.publisher import WeightPublisher
from protocol.config import Config, ModelConfig, NetConfig, RunConfig, WeightsConfig, load_config
from protocol.lora import LORA_KEY, base_shapes, check_adapter, split_config
from protocol.messages import ProtocolError, Weights, WeightsAnnouncement
from protocol.metrics import Monitor, RateLimitedLog
from protocol.weights import manifest_digest, pack_weights, unpack_weights
from rollout_server.weights_client import WeightsClient

LORA = ["learner.lora.rank=4", "learner.lora.alpha=8", "learner.lora.target_modules=['q_proj','v_proj']"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, torch.nn.Module, int]:
    tmp = tmp_path_factory.mktemp("lora_weights")
    cfg = load_config(None, [f"run.dir={tmp}", *LORA])
    build_tiny_model(cfg, cfg.model_dir, alphabet="abcdefghijkl:")
    model, digest = adapter_model(cfg, load_model(cfg.model_dir, torch.device("cpu")))
    return cfg, model, digest


def tampered(w: Weights, change: str) -> Weights:
    """``w``'s adapter broken one way, repacked with valid digests (as a hostile peer would)."""
    tensors = {k: v.clone() for k, v in unpack_weights(w).items()}
    config = json.loads(w.model_config)
    first = next(iter(tensors))
    if change == "wrong shape":
        tensors[first] = torch.zeros(tensors[first].shape[0], tensors[first].shape[1] + 1)
    elif change == "module the base lacks":
        tensors["model.layers.9.self_attn.q_proj.lora_A.weight"] = tensors.pop(first)
    elif change == "NaN":
        tensors[first][0, 0] = float("nan")
    elif change == "module not targeted":
        config[LORA_KEY]["targets"] = ["k_proj"]
    elif change == "lone half":
        del tensors[first]
    elif change == "not an adapter":
        tensors["model.embed_tokens.weight"] = torch.zeros(3, 3)
    elif change == "bad rank":
        config[LORA_KEY]["rank"] = 0
    elif change == "absurd alpha":
        config[LORA_KEY]["alpha"] = 1e30
    return pack_weights(tensors, w.version, json.dumps(config))


CHANGES = ["wrong shape", "module the base lacks", "NaN", "module not targeted", "lone half", "not an adapter"]


@pytest.mark.parametrize("change", [*CHANGES, "bad rank", "absurd alpha"])
def test_a_hostile_adapter_fails_the_boundary_check(lora: tuple[Config, torch.nn.Module, int], change: str) -> None:
    from protocol.lora import check_version

    cfg, model, digest = lora
    good = adapter_version(cfg, model, digest, 1)
    assert check_version(good) is not None
    with pytest.raises(ProtocolError) as e:
        check_version(tampered(good, change))
    assert e.value.reason == "adapter"


def test_check_adapter_names_what_is_wrong(lora: tuple[Config, torch.nn.Module, int]) -> None:
    cfg, model, digest = lora
    w = adapter_version(cfg, model, digest, 1)
    _, spec = split_config(w.model_config)
    assert spec is not None and spec.rank == 4 and spec.scale == 2.0
    with pytest.raises(ProtocolError, match=r"layers\.9.*no linear module"):
        check_adapter(unpack_weights(tampered(w, "module the base lacks")), spec, base_shapes(w.model_config))


@pytest.mark.parametrize("change", CHANGES)
def test_a_hostile_adapter_is_rejected_by_the_weights_client_before_any_engine(
    lora: tuple[Config, torch.nn.Module, int],
    net: NetConfig,  # noqa: F811
    aio: Aio,  # noqa: F811
    publishers: Publishers,  # noqa: F811
    tmp_path: Path,
    change: str,
) -> None:
    """Served by a real publisher with valid digests and the announced manifest: the transfer verifies, the
    boundary check refuses it (``rollout/adapter_rejected``), fetch_latest returns nothing to load; an
    honest adapter published next passes."""
    cfg, model, digest = lora
    pub = publishers.make(net, WeightsConfig(transport="net"))
    bad = publish_packed(pub, tampered(adapter_version(cfg, model, digest, 0), change))
    with lora_client(aio, net, tmp_path, cfg.model_dir) as client:
        client.heard(
            WeightsAnnouncement(version=0, final=False, session=pub.session, manifest=manifest_digest(bad.tensors))
        )
        assert aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S)) is None
        assert client.all_counters()["adapter_rejected"] == 1
        good = publish_packed(pub, adapter_version(cfg, model, digest, 1))
        client.heard(
            WeightsAnnouncement(version=1, final=False, session=pub.session, manifest=manifest_digest(good.tensors))
        )
        w = aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S))
        assert w is not None and w.version == 1 and client.all_counters()["adapter_rejected"] == 1


def test_adapters_travel_as_versions_full_then_deltas(
    lora: tuple[Config, torch.nn.Module, int],
    net: NetConfig,  # noqa: F811
    aio: Aio,  # noqa: F811
    publishers: Publishers,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Nothing in the weights path knows about adapters: the first fetch is the full adapter, the next a
    delta from it, both verified against the announced manifest; an adapter is a small part of the model."""
    cfg, model, digest = lora
    pub = publishers.make(net, WeightsConfig(transport="net"))
    with lora_client(aio, net, tmp_path, cfg.model_dir) as client:
        got = []
        randomize(model, seed=0)
        for v in (0, 1):
            if v:
                with torch.no_grad():  # the next version moves a few values, as a step does
                    next(p for n, p in model.named_parameters() if ".lora_B." in n)[:2] += 1e-3
            w = adapter_version(cfg, model, digest, v)
            sent = publish_packed(pub, w)
            client.heard(
                WeightsAnnouncement(version=v, final=False, session=pub.session, manifest=manifest_digest(sent.tensors))
            )
            fetched = aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S))
            assert fetched is not None and fetched.data.tobytes() == w.data.tobytes()
            client.held = fetched
            got.append(client.sources[-1].last["rollout/weights_delta"])
    assert got == [0, 1]
    full = sum(p.numel() * 4 for p in model.get_base_model().parameters())  # type: ignore[operator]
    assert w.data.nbytes < 0.1 * full


def test_the_adapter_directory_vllm_is_given_is_the_learners_adapter(
    lora: tuple[Config, torch.nn.Module, int], tmp_path: Path
) -> None:
    """The vLLM engine hands each version to vLLM as a peft adapter directory (``LoRARequest``); vLLM is not
    in this environment, so the directory is checked with peft itself: the model it makes computes the
    learner's logits."""
    from peft import PeftModel

    from protocol.lora import write_adapter_dir

    cfg, model, digest = lora
    w = adapter_version(cfg, model, digest, 3)
    _, spec = split_config(w.model_config)
    assert spec is not None
    write_adapter_dir(tmp_path / "v3", unpack_weights(w), spec, str(cfg.model_dir))
    loaded = PeftModel.from_pretrained(load_model(cfg.model_dir, torch.device("cpu")), tmp_path / "v3").eval()
    ids = torch.tensor([[1, 4, 2, 7, 3, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def announce(pub: WeightPublisher, w: Weights) -> WeightsAnnouncement:
    return WeightsAnnouncement(version=w.version, final=False, session=pub.session, manifest=manifest_digest(w.tensors))


@contextmanager
def lora_client(aio: Aio, net: NetConfig, run_dir: Path, model_path: Path) -> Iterator[WeightsClient]:  # noqa: F811
    """A rollout server's weights client whose run directory and model.path are the test's own."""
    cfg = Config(
        run=RunConfig(dir=str(run_dir)),
        model=ModelConfig(path=str(model_path)),
        net=net,
        weights=WeightsConfig(transport="net"),
    )
    monitor = Monitor(run_dir, "rollout-test", tensorboard=False)
    warn = RateLimitedLog(logging.getLogger("podsrl.rollout"), every_s=30.0)
    client = WeightsClient(aio.ctx, cfg, None, None, monitor, warn, lambda: False)
    try:
        yield client
    finally:
        client.close()
        monitor.close()


def test_a_server_without_the_base_fetches_it_once_over_the_weights_link(
    lora: tuple[Config, torch.nn.Module, int],
    net: NetConfig,  # noqa: F811
    aio: Aio,  # noqa: F811
    publishers: Publishers,  # noqa: F811
    tmp_path: Path,
) -> None:
    """model.path empty on the server's side: the first adapter makes the client fetch the learner's base
    (checked by digest), keep it in <run.dir>/base/<digest>, and an engine of that server runs base +
    adapter as the learner does. A second server process on the same run directory finds it: fetched once."""
    from protocol.lora import state_digest
    from rollout_server.engine import TorchEngine

    cfg, model, digest = lora
    learner_base = load_model(cfg.model_dir, torch.device("cpu"))  # as learner.train.Training packs it
    base_state = learner_base.state_dict()
    assert state_digest(base_state) == digest
    zmq_ctx = zmq.Context()
    base = pack_weights(base_state, 0, learner_base.config.to_json_string())
    pub = WeightPublisher(zmq_ctx, net, weights=WeightsConfig(transport="net"), base=base)
    try:
        w = publish_packed(pub, adapter_version(cfg, model, digest, 0))
        for fetched in (1, 0):
            with lora_client(aio, net, tmp_path, tmp_path / "no-model") as client:
                client.heard(announce(pub, w))
                got = aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S))
                assert got is not None and got.version == 0
                assert client.all_counters()["base_fetched"] == fetched
        engine = TorchEngine(client.cfg)
        assert got is not None
        engine.load(got)
        assert engine.model is not None
        ids = torch.tensor([[1, 4, 2, 7, 3, 5]])
        with torch.no_grad():
            torch.testing.assert_close(
                engine.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-5, rtol=0
            )
    finally:
        pub.close()
        zmq_ctx.term()


def test_a_learner_without_a_base_says_so(
    lora: tuple[Config, torch.nn.Module, int],
    net: NetConfig,  # noqa: F811
    aio: Aio,  # noqa: F811
    publishers: Publishers,  # noqa: F811
    tmp_path: Path,
) -> None:
    cfg, model, digest = lora
    pub = publishers.make(net, WeightsConfig(transport="net"))
    w = publish_packed(pub, adapter_version(cfg, model, digest, 0))
    with lora_client(aio, net, tmp_path, tmp_path / "no-model") as client:
        client.heard(announce(pub, w))
        with pytest.raises(RuntimeError, match="serves no base model"):
            aio.loop.run_until_complete(asyncio.wait_for(client.fetch_latest(), FETCH_S))
