"""The policy model: a transformers causal LM loaded from a local directory via ``from_pretrained``.

For the built-in tasks the learner builds a tiny Llama from a config (no hub, no download) and saves
it with ``save_pretrained`` before anyone loads it, so the tiny path and a real checkpoint take the
same loading code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from protocol.config import BOS_ID, EOS_ID, PAD_ID, Config

log = logging.getLogger("podsrl.learner")


def build_tiny_model(cfg: Config, path: Path) -> None:
    """Create the tiny model directory (config.json + weights); deterministic in ``run.seed``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    t = cfg.model.tiny
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=max(64, 2 * (cfg.task.length + cfg.max_new_tokens + 2)),
        tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_config(config)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)  # atomic: a directory that exists is complete
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny model (%d parameters, vocab %d) at %s", n, cfg.vocab_size, path)


def load_model(path: Path, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path}: set model.path to a local transformers model directory, "
                                "or model.init='tiny' with an empty model.path to build one")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def completion_logprobs(model: torch.nn.Module, prompt_ids: list[torch.Tensor], completion_ids: list[torch.Tensor],
                        temperature: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given its prompt, at the sampling temperature.

    Returns ``(logp, mask, entropy)``, each ``(B, Lmax)``: row i holds completion i's tokens
    left-aligned; ``entropy`` is the (detached) entropy of the sampling distribution at each token.
    Sequences are right-padded, so positions start at 0 for every row as they did when sampled.
    """
    rows = [torch.cat([p, c]) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    lmax = max(len(c) for c in completion_ids)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = r, 1
    ids, attn = ids.to(device), attn.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    # Completion token j of row i sits at position P_i + j and is predicted by logits at P_i + j - 1.
    plen = torch.tensor([len(p) for p in prompt_ids], device=device)
    pos = (plen[:, None] - 1 + torch.arange(lmax, device=device)[None, :]).clamp(max=width - 2)
    clen = torch.tensor([len(c) for c in completion_ids], device=device)
    mask = (torch.arange(lmax, device=device)[None, :] < clen[:, None]).float()
    sel = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
    targets = ids.gather(1, (pos + 1).clamp(max=width - 1))
    log_dist = torch.log_softmax(sel, dim=-1)
    logp = log_dist.gather(2, targets[:, :, None])[:, :, 0]
    with torch.no_grad():
        entropy = -(log_dist.exp() * log_dist).sum(-1) * mask
    return logp * mask, mask, entropy
