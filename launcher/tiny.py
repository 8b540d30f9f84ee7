"""The embedded default model: a tiny Llama and a character-level tokenizer, built locally.

Nothing is downloaded. The tokenizer is a real ``tokenizers`` tokenizer (one token per character,
``<pad> <bos> <eos> <unk>`` specials, BOS prepended, a small chat template) saved with
``save_pretrained`` beside the model, so the tiny path and a real checkpoint directory are loaded by
the same code: ``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from protocol.config import Config

log = logging.getLogger("podsrl.launcher")

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_char_tokenizer(alphabet: str, path: Path, words: tuple[str, ...] = ()) -> None:
    """Save a character-level tokenizer for ``alphabet`` (order kept, duplicates dropped) at ``path``;
    ``words`` are whole tokens besides (an environment's tool tags, as a chat model has ``<tool_call>``)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in dict.fromkeys(alphabet) if c not in SPECIALS]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    if words:
        tok.add_tokens(list(words))  # not special: decoding keeps them, so the environment reads them
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def build_tiny_model(cfg: Config, path: Path, alphabet: str, words: tuple[str, ...] = ()) -> int:
    """Create ``path`` (tokenizer + config.json + weights), deterministic in ``run.seed``; return the
    parameter count. Written to a temporary name and renamed: a directory that exists is complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_char_tokenizer(alphabet, tmp, words)
    tok = AutoTokenizer.from_pretrained(tmp)
    t = cfg.model.tiny
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny model (%d parameters, vocabulary of %d) at %s", n, len(tok), path)
    return n
