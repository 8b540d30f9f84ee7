"""The vLLM engine against the learner's recomputation: log-probs, in-place updates, rejected versions.

One vLLM engine for the module (start-up is 10-45 s on 2 cores); the tests run in file order on it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedModel

from launcher.tiny import build_tiny_model
from learner.model import completion_logprobs, load_model
from protocol.codec import decode, encode
from protocol.config import load_config
from protocol.messages import ProtocolError, Weights
from protocol.weights import pack_weights, read_tokenizer_files, with_files
from rollout_server.engine import TorchEngine, build_engine
from rollout_server.sampling import SamplingSpec
from rollout_server.vllm_engine import VLLMEngine

pytestmark = pytest.mark.vllm

ATOL = 1e-4  # fp32; measured ~5e-7
ALPHABET = "abcdefghijkl:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two versions of a tiny Llama (head_dim 32: vLLM's CPU attention rejects 16) and one live engine."""
    models: list[PreTrainedModel] = []
    weights: list[Weights] = []
    for seed in (0, 1):
        tmp = tmp_path_factory.mktemp(f"model{seed}")
        cfg = load_config(
            None, [f"run.dir={tmp}", f"run.seed={seed}", "model.tiny.num_heads=2", "rollout.engine.type=vllm"]
        )
        build_tiny_model(cfg, cfg.model_dir, alphabet=ALPHABET)
        model = load_model(cfg.model_dir, torch.device("cpu"))
        w = pack_weights(model.state_dict(), seed + 1, model.config.to_json_string())
        models.append(model)
        weights.append(decode(encode(w)))  # as a rollout server receives it
    weights[0] = decode(encode(with_files(weights[0], read_tokenizer_files(cfg.model_dir))))
    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    engine = build_engine(cfg)
    assert isinstance(engine, VLLMEngine)
    t0 = time.monotonic()
    engine.load(weights[0])
    print(f"\nvLLM start-up and first load: {time.monotonic() - t0:.1f}s")
    yield cfg, tok, models, weights, engine
    engine.close()


def recompute(model, prompts, samples, n: int, temperature: float) -> list[np.ndarray]:
    rows = [p for p in prompts for _ in range(n)]
    with torch.no_grad():
        logp, mask, _ = completion_logprobs(
            model,
            [torch.from_numpy(p.astype(np.int64)) for p in rows],
            [torch.from_numpy(c.astype(np.int64)) for c in samples.ids],
            temperature,
            torch.device("cpu"),
        )
    assert [int(m.sum()) for m in mask] == [len(c) for c in samples.ids]
    return [logp[i, : len(c)].numpy() for i, c in enumerate(samples.ids)]


def max_error(model, prompts, samples, n: int, temperature: float) -> float:
    ref = recompute(model, prompts, samples, n, temperature)
    return max(float(np.abs(r - lp).max()) for r, lp in zip(ref, samples.logprobs, strict=True))


def spec(tok, temperature: float, max_new_tokens: int = 8) -> SamplingSpec:
    return SamplingSpec(max_new_tokens, temperature, (tok.eos_token_id,), tok.pad_token_id)


def encode_text(tok, text: str) -> np.ndarray:
    return np.asarray(tok(text)["input_ids"], np.int32)


def long_prompt(tok, engine) -> np.ndarray:
    """Longer than two KV blocks, so vLLM's prefix cache holds full blocks of it."""
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    return encode_text(tok, (ALPHABET * (2 * block // len(ALPHABET) + 2))[: 2 * block + 5] + ":")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_learner_recomputation(setup, temperature):
    cfg, tok, models, weights, engine = setup
    assert engine.version == 1
    prompts = [encode_text(tok, t) for t in ("abcd:", "ab:", "lkjihgfedcba:")]
    samples = engine.generate(prompts, 5, spec(tok, temperature), seed=3)
    assert len(samples.ids) == 15
    for ids, lps in zip(samples.ids, samples.logprobs, strict=True):
        assert 1 <= len(ids) <= 8 and len(ids) == len(lps)
        assert tok.eos_token_id not in ids[:-1], "generation continued past EOS"
        assert ids.dtype == np.int32 and lps.dtype == np.float32
    assert len({tuple(i) for i in samples.ids[:5]}) > 1, "the n completions of a prompt must differ"
    err = max_error(models[0], prompts, samples, 5, temperature)
    print(f"\nT={temperature}: max |vLLM - learner| log-prob error {err:.2e}")
    assert err < ATOL
    again = engine.generate(prompts, 5, spec(tok, temperature), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(samples.ids, again.ids, strict=True)), "same seed, same samples"


def test_stale_prefix_cache_would_be_caught(setup):
    """The control for the next test: loading without the prefix-cache reset gives the old KV values."""
    cfg, tok, models, weights, engine = setup
    prompt = [long_prompt(tok, engine)]
    engine.generate(prompt, 1, spec(tok, 0.0), seed=0)  # caches the prompt's blocks under version 1
    w = weights[1]
    engine.llm.collective_rpc("podsrl_load", args=(w.version, w.tensors, w.data.tobytes()))  # no reset
    stale = engine.generate(prompt, 1, spec(tok, 1.0), seed=0)
    assert max_error(models[1], prompt, stale, 1, 1.0) > 0.01, "the prefix cache was not reused: no control"
    engine.load(weights[0])  # back to version 1, properly


def test_new_version_is_followed_and_old_prefix_cache_not_reused(setup):
    cfg, tok, models, weights, engine = setup
    prompt = [long_prompt(tok, engine)]
    before = engine.generate(prompt, 1, spec(tok, 0.0), seed=0)  # caches the prompt's blocks under version 1
    t0 = time.monotonic()
    engine.load(weights[1])
    print(f"\nin-place load of {weights[1].data.nbytes / 2**20:.2f} MiB: {time.monotonic() - t0:.3f}s")
    assert engine.version == 2
    after = engine.generate(prompt, 1, spec(tok, 0.0), seed=0)
    torch_engine = TorchEngine(cfg)
    torch_engine.load(weights[1])
    reference = torch_engine.generate(prompt, 1, spec(tok, 0.0), seed=0)
    assert np.array_equal(after.ids[0], reference.ids[0]), "greedy tokens differ from the torch engine's"
    assert max_error(models[1], prompt, after, 1, 1.0) < ATOL  # greedy log-probs are temperature 1's
    assert max_error(models[0], prompt, before, 1, 1.0) < ATOL
    sampled = engine.generate(prompt, 4, spec(tok, 0.7), seed=5)
    assert max_error(models[1], prompt, sampled, 4, 0.7) < ATOL


def test_corrupt_version_leaves_the_previous_one_loaded(setup):
    cfg, tok, models, weights, engine = setup
    engine.load(weights[1])
    good = weights[0]
    bad_digest = dataclasses.replace(good, version=7, tensors=[[*t[:5], t[5] ^ 1] for t in good.tensors])
    data = good.data.copy()
    data[len(data) // 2] ^= 0xFF
    bad_data = dataclasses.replace(good, version=8, data=data)
    for bad in (bad_digest, bad_data):
        with pytest.raises(ProtocolError, match="checksum"):
            engine.load(bad)
        assert engine.version == 2
    prompt = [long_prompt(tok, engine)]
    samples = engine.generate(prompt, 3, spec(tok, 1.0), seed=2)
    assert max_error(models[1], prompt, samples, 3, 1.0) < ATOL
