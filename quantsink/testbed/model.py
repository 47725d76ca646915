"""The paper's BB transformer as a standard transformers architecture: OPT.

Guo et al. (2024): learned absolute positions, pre-LayerNorm, bias-free attention, a ReLU MLP
of width 4d, an untied output head, 1 or 3 layers of 1 head, d = 256.  ``OPTForCausalLM``
expresses exactly that with ``enable_bias=False`` (no bias in q/k/v/out or the MLP; LayerNorms
keep their affine weight and bias, as the paper's ``nn.LayerNorm``), ``do_layer_norm_before``,
``activation_function="relu"``, ``ffn_dim=4d`` and ``tie_word_embeddings=False``.  OPT also
applies a final LayerNorm before the head (the paper's model has one too).

Every ``--attention`` but softmax is a kernel of :data:`quantsink.hooks.attention.KERNELS` (relu,
softmax1, sink-logit, gated, softpick), registered in transformers' ``AttentionInterface``; the config
records ``quantsink_attention`` so that ``quantsink eval --model DIR`` (``load_model``) selects it again,
and adds back the learned per-head sink logits or gate weights, without remote code.
"""

from __future__ import annotations

from typing import Any

from quantsink.hooks.attention import KERNELS, add_parameters, register
from ..registry import Registry
from .data import BigramBackcopy

#: ``--attention`` -> attn_implementation used while training (softmax: SDPA; the probes switch to eager)
ATTENTIONS: Registry[str] = Registry("attention")
ATTENTIONS.register("softmax", "sdpa", help="softmax attention (the standard transformer)")
for _entry in KERNELS:
    ATTENTIONS.register(_entry.name, _entry.obj.implementation, help=_entry.help, aliases=_entry.aliases)


def build_config(task: BigramBackcopy, *, layers: int, d: int = 256, heads: int = 1,
                 attention: str = "softmax") -> Any:
    """An OPTConfig for the BB model (untrained)."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=len(task.vocab), hidden_size=d, word_embed_proj_dim=d, num_hidden_layers=layers,
        num_attention_heads=heads, ffn_dim=4 * d, max_position_embeddings=task.seq_len,
        do_layer_norm_before=True, enable_bias=False, activation_function="relu", dropout=0.0,
        attention_dropout=0.0, layerdrop=0.0, tie_word_embeddings=False, init_std=0.02,
        bos_token_id=task.bos_id, pad_token_id=task.vocab.index("⟨pad⟩"), eos_token_id=None,
        quantsink_attention=ATTENTIONS.canonical(attention),
    )


def build_model(config: Any) -> Any:
    """An OPTForCausalLM from ``config`` with the attention its ``quantsink_attention`` names,
    initialised as the paper's model (PyTorch defaults, see :func:`paper_init`)."""
    from transformers import OPTForCausalLM

    register()
    name = config.quantsink_attention
    model = OPTForCausalLM._from_config(config, attn_implementation=ATTENTIONS.get(name))
    return paper_init(add_parameters(model, name) if name in KERNELS.names() else model)


def paper_init(model: Any) -> Any:
    """PyTorch's default initialisation, as the paper's plain ``nn`` model has: embeddings (token and
    position) N(0, 1), Linear Kaiming-uniform, LayerNorm (1, 0).  OPT's own init (N(0, 0.02)
    everywhere) starts the residual stream ~50x smaller and delays the sink.  A gate's ``gate_proj`` is a
    Linear (Kaiming-uniform); sink logits keep their 0."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.reset_parameters()
    return model
