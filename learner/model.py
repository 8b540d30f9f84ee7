"""The policy model: a transformers causal LM loaded from a local directory via ``from_pretrained``.

For the built-in tasks the launcher builds a tiny Llama and its tokenizer (``launcher/tiny.py``: no
hub, no download) before any process starts, so the tiny path and a real checkpoint take the same
loading code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("podsrl.learner")


def load_model(path: Path, device: torch.device) -> PreTrainedModel:
    """The model at ``path`` in fp32 (the master weights; ``model.dtype`` is the compute dtype only)."""
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no model at {path}: set model.path to a local transformers model directory, "
            "or model.init='tiny' and start through `podsrl run`/`podsrl learner`, which build one"
        )
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.nn.Module.to(model, device)  # in place (transformers' typed ``to`` confuses type checkers)
    return model


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[torch.Tensor],
    completion_ids: list[torch.Tensor],
    temperature: float,
    device: torch.device,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given its prompt, at the sampling temperature.

    Returns ``(logp, mask, entropy)``, each ``(B, Lmax)``: row i holds completion i's tokens
    left-aligned; ``entropy`` is the entropy of the sampling distribution at each token (detached
    unless ``entropy_grad``: an entropy bonus needs its gradient).
    Sequences are right-padded, so positions start at 0 for every row as they did when sampled.
    """
    rows = [torch.cat([p, c]) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    lmax = max(len(c) for c in completion_ids)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # padding: masked out, any id will do
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], attn[i, : len(r)] = r, 1
    ids, attn = ids.to(device), attn.to(device)
    # use_cache=False: training never decodes, and gradient checkpointing requires it. Log-probs are taken
    # in fp32 whatever the compute dtype (bf16 logits would round the importance ratios).
    out = model(input_ids=ids, attention_mask=attn, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature
    # Completion token j of row i sits at position P_i + j and is predicted by logits at P_i + j - 1.
    plen = torch.tensor([len(p) for p in prompt_ids], device=device)
    pos = (plen[:, None] - 1 + torch.arange(lmax, device=device)[None, :]).clamp(max=width - 2)
    clen = torch.tensor([len(c) for c in completion_ids], device=device)
    mask = (torch.arange(lmax, device=device)[None, :] < clen[:, None]).float()
    sel = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
    targets = ids.gather(1, (pos + 1).clamp(max=width - 1))
    log_dist = torch.log_softmax(sel, dim=-1)
    logp = log_dist.gather(2, targets[:, :, None])[:, :, 0]
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(log_dist.exp() * log_dist).sum(-1) * mask
    return logp * mask, mask, entropy
