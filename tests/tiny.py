"""The one factory for tiny models built from a config (no download): every test that needs a small
Llama calls :func:`tiny_llama` instead of writing its own ``LlamaConfig``."""

from __future__ import annotations

from typing import Any


def tiny_llama(vocab: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               positions: int = 256, seed: int = 0, **config: Any) -> Any:
    """A ``LlamaForCausalLM`` in eval mode, weights from ``torch.manual_seed(seed)``, untied head;
    the MLP is twice the hidden size.  Extra ``config`` keys go to ``LlamaConfig``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=positions, tie_word_embeddings=False, **config)
    return LlamaForCausalLM(config).eval()
