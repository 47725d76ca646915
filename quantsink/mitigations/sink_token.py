"""``sink-token[:token=...]``: a dedicated sink token prepended to every window, never scored.

Every window's sink then sits on the same known token: the tokenizer's BOS
when it has one, else the ``token`` given (a token string or an id).  The
prepended position is not scored and the scored tokens are exactly the
original ones, in the same order, so KL and top-1 pair with the reference
pass over the original windows.  Windows grow by one position; the first
content token, which was unscored for lack of context, stays unscored.
A window that already begins with that token at a sink position (BOS) is left
as it is, and the record says it was a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantsink.data.windows import Windows
from ..errors import UsageError
from . import Env, Mitigation, register


def resolve_token(tokenizer: Any, token: int | str | None) -> tuple[int, str]:
    """``(id, text)`` of the sink token: ``token`` (id or string), else the tokenizer's BOS."""
    if token is None:
        if tokenizer.bos_token_id is None:
            raise UsageError("sink-token: this tokenizer has no BOS token; name one, e.g. sink-token:token=<id>")
        return int(tokenizer.bos_token_id), str(tokenizer.bos_token)
    if isinstance(token, int):
        if not 0 <= token < len(tokenizer):
            raise UsageError(f"sink-token:token={token} is outside the vocabulary (0..{len(tokenizer) - 1})")
        return token, str(tokenizer.convert_ids_to_tokens(token))
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise UsageError(f"sink-token:token={token!r} is not a token of this tokenizer; give a token or an id")
    return int(tid), token


def prepend(windows: Windows, token_id: int) -> Windows:
    """``windows`` with ``token_id`` prepended as an unscored sink position.  (N, T) -> (N, T+1)"""
    n = len(windows)
    col = torch.full((n, 1), token_id, dtype=windows.input_ids.dtype)
    return Windows(torch.cat([col, windows.input_ids], 1),
                   torch.cat([torch.ones_like(col, dtype=windows.attention_mask.dtype), windows.attention_mask], 1),
                   torch.cat([torch.zeros((n, 1), dtype=torch.bool), windows.scored], 1),
                   windows.nbytes, (0, *(p + 1 for p in windows.sink_positions)), windows.feeds_last)


@dataclass(frozen=True)
class SinkToken(Mitigation):
    token: int | str | None = None
    changes_input: ClassVar[bool] = True

    def wrap_for_lm_eval(self, model: Any, tokenizer: Any) -> Any:
        """lm-eval sees the sink token too: prepended inside the model's forward."""
        return prepend_token(model, resolve_token(tokenizer, self.token)[0])

    def transform_windows(self, windows: Windows, env: Env) -> Windows:
        token_id, text = resolve_token(env.tokenizer, self.token)
        env.notes.update(token=text, token_id=token_id)
        already = 0 in windows.sink_positions and bool((windows.input_ids[:, 0] == token_id).all())
        if already:
            env.notes.update(applied=False, why="no-op: every window already begins with this token (BOS)")
            return windows
        env.notes.update(applied=True, window_length=int(windows.input_ids.shape[1]) + 1)
        return prepend(windows, token_id)


register(SinkToken(name="sink-token"), "prepend a dedicated sink token (BOS, or token=...) to every window, "
         "never scored")


def prepend_token(model: Any, token_id: int) -> Any:
    """A model wrapper for lm-eval (what a prepended-sink mitigation's ``wrap_for_lm_eval`` can
    return): ``token_id`` goes before every input row inside ``forward`` and its logits are
    dropped, so lm-eval scores the model as the mitigation runs it.  (B, T) -> logits (B, T, V)"""
    import torch

    class PrependToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config = model, model.config

        @property
        def device(self) -> Any:
            return self.inner.device

        def tie_weights(self, *args: Any, **kwargs: Any) -> None:
            pass  # HFLM calls it; the wrapped model is tied (or not) already

        def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
            sink = torch.full_like(input_ids[:, :1], int(token_id))  # (B, 1)
            out = self.inner(input_ids=torch.cat([sink, input_ids], 1), use_cache=False)  # (B, T+1, V)
            out.logits = out.logits[:, 1:]  # (B, T, V)
            return out

    return PrependToken()


# --------------------------------------------------------------------------- running
