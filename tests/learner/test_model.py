"""The tiny model's local save/load path, and engine/learner agreement on log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learner.model import build_tiny_model, completion_logprobs, load_model
from protocol.codec import decode, encode
from protocol.config import EOS_ID, load_config
from protocol.weights import pack_weights
from rollout_server.engine import TorchEngine
from rollout_server.tasks import build_task


@pytest.fixture
def tiny(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "task.length=4"])
    build_tiny_model(cfg, cfg.model_dir)
    return cfg, load_model(cfg.model_dir, torch.device("cpu"))


def test_tiny_model_is_a_local_from_pretrained_directory(tiny):
    cfg, model = tiny
    assert (cfg.model_dir / "config.json").exists()
    assert model.config.vocab_size == cfg.vocab_size
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_learner_recomputation(tiny, temperature):
    """On-policy, the importance ratio must be exactly 1: sampling and training see the same numbers,
    also with prompts of different lengths (left padding in the engine, right padding in the learner)."""
    cfg, model = tiny
    engine = TorchEngine(cfg)
    wire = decode(encode(pack_weights(model.state_dict(), 3, model.config.to_json_string())))
    engine.load(wire)
    assert engine.version == 3
    rng = np.random.default_rng(0)
    task = build_task(cfg.task)
    prompts = [task.sample_prompt(rng), task.sample_prompt(rng)[:4], task.sample_prompt(rng)]
    samples = engine.generate(prompts, n=5, max_new_tokens=6, temperature=temperature, seed=1)
    assert len(samples.ids) == 15
    for ids, lps in zip(samples.ids, samples.logprobs, strict=True):
        assert 1 <= len(ids) <= 6 and len(ids) == len(lps)
        assert EOS_ID not in ids[:-1], "generation continued past EOS"
    rows = [p for p in prompts for _ in range(5)]
    with torch.no_grad():
        logp, mask, entropy = completion_logprobs(model, [torch.from_numpy(p.astype(np.int64)) for p in rows],
                                         [torch.from_numpy(c.astype(np.int64)) for c in samples.ids],
                                         temperature, torch.device("cpu"))
    for i, lps in enumerate(samples.logprobs):
        np.testing.assert_allclose(logp[i, :len(lps)].numpy(), lps, atol=2e-5)
        assert mask[i].sum() == len(lps)
    assert ((entropy >= 0) & (entropy <= np.log(cfg.vocab_size) + 1e-5)).all()
    assert (entropy[mask == 0] == 0).all() and (entropy[mask > 0] > 0).all()


def test_engine_sampling_is_deterministic_in_seed(tiny):
    cfg, model = tiny
    engine = TorchEngine(cfg)
    engine.load(pack_weights(model.state_dict(), 0, model.config.to_json_string()))
    prompt = [np.array([1, 5, 6, 7, 8, 2], np.int32)]
    a = engine.generate(prompt, 8, 5, 1.0, seed=7)
    b = engine.generate(prompt, 8, 5, 1.0, seed=7)
    c = engine.generate(prompt, 8, 5, 1.0, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.ids, c.ids, strict=True))


def test_missing_model_directory_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_model(tmp_path / "nope", torch.device("cpu"))
