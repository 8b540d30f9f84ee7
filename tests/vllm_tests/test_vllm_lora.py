"""LoRA versions on the vLLM engine (issue 22, docs/LORA.md): vLLM's own LoRA support on its CPU build.

The engine starts on the base at ``model.path`` (checked against the version's base digest) with
``enable_lora``; each version is a ``LoRARequest`` loaded in place, without restarting the engine. The
behaviour log-probs it returns must equal the learner's peft model's recomputation, as for full weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_helpers import adapter_model, adapter_version, randomize
from transformers import AutoTokenizer

from launcher.tiny import build_tiny_model
from learner.model import completion_logprobs, load_model
from protocol.codec import decode, encode
from protocol.config import load_config
from rollout_server.engine import build_engine
from rollout_server.sampling import SamplingSpec
from rollout_server.vllm_engine import VLLMEngine

pytestmark = pytest.mark.vllm

ATOL = 1e-4  # fp32, as for full weights (tests/vllm_tests/test_vllm_engine.py)
ALPHABET = "abcdefghijkl:"
LORA = ["learner.lora.rank=4", "learner.lora.alpha=8", "learner.lora.target_modules=['q_proj','v_proj','down_proj']"]


def logprob_error(peft_model, prompts, samples, n: int, temperature: float, adapter: bool = True) -> float:
    """max |engine - recomputation| over every sampled token, with the adapter on (or off: the base)."""
    rows = [torch.from_numpy(p.astype(np.int64)) for p in prompts for _ in range(n)]
    done = [torch.from_numpy(c.astype(np.int64)) for c in samples.ids]
    with torch.no_grad():
        if adapter:
            logp, _, _ = completion_logprobs(peft_model, rows, done, temperature, torch.device("cpu"))
        else:
            with peft_model.disable_adapter():
                logp, _, _ = completion_logprobs(peft_model, rows, done, temperature, torch.device("cpu"))
    return max(float(np.abs(logp[i, : len(lp)].numpy() - lp).max()) for i, lp in enumerate(samples.logprobs))


def test_adapter_versions_load_in_place_and_logprobs_equal_the_learners(tmp_path):
    cfg = load_config(
        None, [f"run.dir={tmp_path}", "model.tiny.num_heads=2", "rollout.engine.type=vllm", "task.length=4", *LORA]
    )
    build_tiny_model(cfg, cfg.model_dir, alphabet=ALPHABET)  # the base, at model.path on this server too
    peft_model, digest = adapter_model(cfg, load_model(cfg.model_dir, torch.device("cpu")))
    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    sampling = SamplingSpec(6, 1.0, (tok.eos_token_id,), tok.pad_token_id)
    prompts = [np.asarray(tok(t)["input_ids"], np.int32) for t in ("abcd:", "ab:", "lkjihg:")]
    engine = build_engine(cfg)
    assert isinstance(engine, VLLMEngine)
    try:
        llm = None
        for v in (1, 2):  # the second version replaces the first in place: the same engine, a new request
            randomize(peft_model, seed=v)
            engine.load(decode(encode(adapter_version(cfg, peft_model, digest, v))))
            assert engine.version == v and engine.lora_request is not None
            assert llm is None or engine.llm is llm, "a new adapter version restarted the engine"
            llm = engine.llm
            samples = engine.generate(prompts, 4, sampling, seed=v)
            err = logprob_error(peft_model, prompts, samples, 4, 1.0)
            print(f"\nLoRA version {v}: max |vLLM - learner| log-prob error {err:.2e}")
            assert err < ATOL
            base_err = logprob_error(peft_model, prompts, samples, 4, 1.0, adapter=False)
            assert base_err > 1e-2, "the adapter changes nothing: this test would prove nothing"
    finally:
        engine.close()


def test_a_base_unlike_the_learners_is_refused_before_vllm_starts(tmp_path):
    """The adapter was made for the learner's base (its digest travels with every version): a server whose
    model.path holds other weights refuses it, naming the fix, and never starts vLLM on the wrong base."""
    learner = load_config(None, [f"run.dir={tmp_path / 'learner'}", "model.tiny.num_heads=2", *LORA])
    build_tiny_model(learner, learner.model_dir, alphabet=ALPHABET)
    peft_model, digest = adapter_model(learner, load_model(learner.model_dir, torch.device("cpu")))
    other = load_config(
        None,
        [f"run.dir={tmp_path / 'server'}", "run.seed=123", "model.tiny.num_heads=2", "rollout.engine.type=vllm", *LORA],
    )
    build_tiny_model(other, other.model_dir, alphabet=ALPHABET)  # the same shapes, other weights
    engine = build_engine(other)
    assert isinstance(engine, VLLMEngine)
    with pytest.raises(RuntimeError, match="base"):
        engine.load(decode(encode(adapter_version(learner, peft_model, digest, 1))))
    assert engine.llm is None, "vLLM started on a base the adapter was not made for"
