"""Tiny Hugging Face decoder models built from configs (random init, nothing downloaded).

``build(name, layers=4, width=256, seq=256, vocab=...)`` returns a model ready for training with
``torch.compile``: its causal-LM loss is set so that it does not break the graph, and the KV
cache is off.
"""
from __future__ import annotations

import torch

PRESETS = ("gpt2", "llama")


def build(name: str, *, layers: int = 4, width: int = 256, seq: int = 256, vocab: int = 2048,
          heads: int | None = None, dropout: float = 0.0) -> torch.nn.Module:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    heads = heads or max(1, width // 64)
    if name == "gpt2":
        config = transformers.GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, n_positions=seq, vocab_size=vocab,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
            bos_token_id=0, eos_token_id=0, use_cache=False,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif name == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=layers, hidden_size=width, intermediate_size=(8 * width) // 3 // 64 * 64 or 2 * width,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
            vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False,
            attention_dropout=dropout,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    # transformers 5.x: without an explicit loss type the loss lookup logs and breaks the graph.
    model.loss_type = "ForCausalLM"
    model.config.use_cache = False
    return model


def batch(vocab: int, batch_size: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq), generator=g)
