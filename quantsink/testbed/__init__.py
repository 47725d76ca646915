"""The paper's own testbed: Bigram-Backcopy (BB) models trained in the harness (Guo et al. 2024).

``data`` (the task over python-docs characters), ``model`` (an OPT config with the paper's
architecture; ReLU attention through transformers' AttentionInterface), ``probe`` (Attn_<s>,
value-state drain, residual-state peak, dormant/active split), ``train`` (AdamW/SGD,
resumable checkpoints, history), ``report`` (CSV, plots).  ``quantsink testbed train`` is the CLI.
"""
