"""The tiny model's local save/load path, and engine/learner agreement on log-probs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from launcher.tiny import build_tiny_model
from learner.model import completion_logprobs, load_model
from protocol.codec import decode, encode
from protocol.config import load_config
from protocol.messages import Weights
from protocol.weights import pack_weights


@pytest.fixture
def tiny(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "task.length=4"])
    build_tiny_model(cfg, cfg.model_dir, alphabet="abcdefghijkl:")
    return cfg, load_model(cfg.model_dir, torch.device("cpu"))


def vocab(cfg) -> int:
    return len(AutoTokenizer.from_pretrained(cfg.model_dir))


def test_tiny_model_is_a_local_from_pretrained_directory(tiny):
    cfg, model = tiny
    assert (cfg.model_dir / "config.json").exists()
    assert model.config.vocab_size == vocab(cfg)
    assert 10_000 < sum(p.numel() for p in model.parameters()) < 1_000_000


def spec(cfg, temperature: float, max_new_tokens: int = 6):
    from rollout_server.sampling import SamplingSpec

    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    return tok, SamplingSpec(max_new_tokens, temperature, (tok.eos_token_id,), tok.pad_token_id)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_learner_recomputation(tiny, temperature):
    """On-policy, the importance ratio must be exactly 1: sampling and training see the same numbers,
    also with prompts of different lengths (left padding in the engine, right padding in the learner)."""
    from rollout_server.engine import TorchEngine

    cfg, model = tiny
    engine = TorchEngine(cfg)
    wire: Weights = decode(encode(pack_weights(model.state_dict(), 3, model.config.to_json_string())))
    engine.load(wire)
    assert engine.version == 3
    tok, sampling = spec(cfg, temperature)
    prompts = [np.asarray(tok(t)["input_ids"], np.int32) for t in ("abcd:", "ab:", "lkjihg:")]
    assert len({len(p) for p in prompts}) == 3
    samples = engine.generate(prompts, 5, sampling, seed=1)
    assert len(samples.ids) == 15
    for ids, lps in zip(samples.ids, samples.logprobs, strict=True):
        assert 1 <= len(ids) <= 6 and len(ids) == len(lps)
        assert tok.eos_token_id not in ids[:-1], "generation continued past EOS"
    rows = [p for p in prompts for _ in range(5)]
    with torch.no_grad():
        logp, mask, entropy = completion_logprobs(
            model,
            [torch.from_numpy(p.astype(np.int64)) for p in rows],
            [torch.from_numpy(c.astype(np.int64)) for c in samples.ids],
            temperature,
            torch.device("cpu"),
        )
    for i, lps in enumerate(samples.logprobs):
        np.testing.assert_allclose(logp[i, : len(lps)].numpy(), lps, atol=2e-5)
        assert mask[i].sum() == len(lps)
    assert ((entropy >= 0) & (entropy <= np.log(vocab(cfg)) + 1e-5)).all()
    assert (entropy[mask == 0] == 0).all() and (entropy[mask > 0] > 0).all()


def test_engine_sampling_is_deterministic_in_seed_and_greedy_is_argmax(tiny):
    from rollout_server.engine import TorchEngine

    cfg, model = tiny
    engine = TorchEngine(cfg)
    engine.load(pack_weights(model.state_dict(), 0, model.config.to_json_string()))
    tok, sampling = spec(cfg, 1.0, max_new_tokens=5)
    prompt = [np.asarray(tok("abcd:")["input_ids"], np.int32)]
    a = engine.generate(prompt, 8, sampling, seed=7)
    b = engine.generate(prompt, 8, sampling, seed=7)
    c = engine.generate(prompt, 8, sampling, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.ids, c.ids, strict=True))
    _, greedy = spec(cfg, 0.0, max_new_tokens=5)
    g = engine.generate(prompt, 3, greedy, seed=1)
    assert all(np.array_equal(g.ids[0], x) for x in g.ids[1:]), "greedy decoding must not depend on the seed"
    with torch.no_grad():
        first = model(torch.from_numpy(prompt[0].astype(np.int64))[None]).logits[0, -1]
    assert g.ids[0][0] == int(first.argmax())


def test_the_engine_loads_from_a_device_copy_when_given(tiny):
    """A torch engine on CUDA loads a version from its CUDA IPC device copy (protocol/cuda_ipc.py). On
    CPU the path is the same with a CPU tensor standing in: the weights come from ``device_data``, not
    from the host bytes (zeroed here), and without it from the host bytes."""
    from rollout_server.engine import TorchEngine

    cfg, model = tiny
    w = pack_weights(model.state_dict(), 2, model.config.to_json_string())
    copy = torch.from_numpy(w.data.copy())
    w.data[:] = 0
    engine = TorchEngine(cfg)
    engine.load(w, verified=True, device_data=copy)
    assert engine.model is not None and engine.version == 2
    got = engine.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    engine.load(w, verified=True)
    assert all(bool((v == 0).all()) for v in engine.model.state_dict().values())


def test_missing_model_directory_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_model(tmp_path / "nope", torch.device("cpu"))


CPU = torch.device("cpu")
LORA = ["learner.lora.rank=4", "learner.lora.alpha=8", "learner.lora.target_modules=['q_proj','v_proj','down_proj']"]


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_with_an_adapter_equal_learner_recomputation(tiny, mode, temperature):
    """As above with LoRA: the engine builds the base from its own model.path (checked by digest),
    applies the adapter that travelled (merged into a copy of the base weights, or unmerged) and samples
    with the log-probs the learner's peft model recomputes, in fp32 to the same tolerance."""
    from lora_helpers import adapter_model, adapter_version, randomize

    from protocol.lora import check_version
    from rollout_server.engine import TorchEngine

    cfg, model = tiny
    cfg = load_config(None, [f"run.dir={cfg.run.dir}", "task.length=4", f"rollout.engine.lora_mode={mode}", *LORA])
    peft_model, digest = adapter_model(cfg, model)
    engine = TorchEngine(cfg)
    for v in (1, 2):  # a second version replaces the first (merged: from the private base copy)
        randomize(peft_model, seed=v)
        wire: Weights = decode(encode(adapter_version(cfg, peft_model, digest, v)))
        assert all(".lora_" in t[0] for t in wire.tensors)
        assert check_version(wire) is not None
        engine.load(wire)
        assert engine.version == v
    tok, sampling = spec(cfg, temperature)
    prompts = [np.asarray(tok(t)["input_ids"], np.int32) for t in ("abcd:", "ab:", "lkjihg:")]
    samples = engine.generate(prompts, 5, sampling, seed=1)
    rows = [torch.from_numpy(p.astype(np.int64)) for p in prompts for _ in range(5)]
    done = [torch.from_numpy(c.astype(np.int64)) for c in samples.ids]
    with torch.no_grad():
        logp, _, _ = completion_logprobs(peft_model, rows, done, temperature, CPU)
        with peft_model.disable_adapter():
            base_logp, _, _ = completion_logprobs(peft_model, rows, done, temperature, CPU)
    moved = 0.0
    for i, lps in enumerate(samples.logprobs):
        np.testing.assert_allclose(logp[i, : len(lps)].numpy(), lps, atol=2e-5)
        moved = max(moved, float(np.abs(base_logp[i, : len(lps)].numpy() - lps).max()))
    assert moved > 1e-2, "the adapter should change the log-probs (else this test proves nothing)"


def test_an_engine_refuses_a_base_unlike_the_learners_and_names_the_fix(tiny, tmp_path):
    from lora_helpers import adapter_model, adapter_version

    from launcher.tiny import build_tiny_model
    from rollout_server.engine import TorchEngine

    cfg, model = tiny
    cfg = load_config(None, [f"run.dir={cfg.run.dir}", "task.length=4", *LORA])
    peft_model, digest = adapter_model(cfg, model)
    w = adapter_version(cfg, peft_model, digest, 1)
    missing = load_config(None, [f"run.dir={tmp_path / 'none'}", *LORA])
    with pytest.raises(RuntimeError, match="neither at model.path nor fetched"):
        TorchEngine(missing).load(w)
    other = load_config(None, [f"run.dir={tmp_path / 'other'}", "run.seed=123", *LORA])  # other weights
    build_tiny_model(other, other.model_dir, alphabet="abcdefghijkl:")
    with pytest.raises(RuntimeError, match="neither at model.path nor fetched"):
        TorchEngine(other).load(w)
