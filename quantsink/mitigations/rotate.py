"""``rotate[:online=down|none,seed=0]``: a randomised Hadamard rotation of the residual stream, fused into
the weights (QuaRot, Ashkboos et al. 2024; SpinQuant's training-free variant).

With an orthogonal ``Q = diag(s) H / sqrt(n)`` (``H`` a Hadamard matrix of the hidden size ``n``, ``s`` random
signs drawn from ``seed``), the model computes the same function on the rotated residual stream ``h Q``:

* every norm that feeds Linears is an RMSNorm; its gain ``g`` is folded first into the Linears it feeds
  (``W <- W diag(g) Q``) and set to 1 (``rms(h Q) = rms(h)``); the final norm folds into ``lm_head``;
* the embedding rows become ``E Q``; a tied ``lm_head`` is untied first;
* each Linear writing into the residual stream (the attention output and the MLP's down projection)
  becomes ``Q^T W`` (bias ``b Q``) -- unless a norm sits between it and the residual add (Gemma 3's
  post-attention / post-feedforward norms normalise the block output before the add): such a norm's output
  is rotated online (``x -> x Q``, two hidden-size matmuls per layer), which keeps the model exact;
* ``online=down`` (default) also rotates the input of every MLP down projection online with a randomised
  Hadamard of the intermediate size (``x -> x H'``, ``W_down <- W_down H'``), as QuaRot does.

``gain=keep`` leaves the residual stream and every gain alone and rotates each norm's output online
(``x -> x Q``, the Linears it feeds ``W Q``; the head, never quantized, is left out).  Folding is wrong for a
model whose norm gains suppress its outlier channels: on Gemma 3 the normed input of q/k/v and gate/up has
72-97% of its energy in 4 channels whose gains are 15-40x below the median gain; ``W diag(g) Q`` mixes
those channels with the large-gain ones, and int8 per-channel weight noise times the outlier channels
takes the weight-only int8 ppl from 10.9 to 72 (measured, 2 windows of python-code).  Rotating after the
gain keeps the suppression.

The online rotations are hooks (``hooks.attach``) attached while the candidate runs, static calibration
included, ahead of the scheme's quantizers and of any probe.

The parts are found from the data flow of a short traced forward (which module's output is which module's
input), not from per-architecture names.  The float model must compute the same logits afterwards: the max
logit difference on a calibration window is measured and recorded, and a model where it exceeds 1% of the
max |logit| is refused.  Rotation spreads a massive activation (one channel) over all channels: the
residual-state norms, so the peak ratio by norm, are unchanged; the largest single |activation| drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Literal

import torch
from torch import nn

from ..errors import QuantsinkError
from quantsink.hooks.sites import FQN, Hook, attach, sites
from . import Env, Mitigation, register, require_linear_scheme

TOLERANCE = 1e-2  # refuse when the float logits move by more than this share of the max |logit|


# --------------------------------------------------------------------------- Hadamard matrices


def sylvester(k: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``2^k``.  (2^k, 2^k)"""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 mod 4``."""
    squares = {i * i % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # (q, q), antisymmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` as ``Paley(q) x Sylvester(2^k)`` (None when this construction has none).
    E.g. 576 = 72 x 8 (q = 71), 640 = 20 x 32 (q = 19), 1536 = 12 x 128 (q = 11)."""
    k = (n & -n).bit_length() - 1  # n = m 2^k, m odd
    m = n >> k
    if m == 1:
        return sylvester(k)
    for j in range(k + 1):
        q = m * 2 ** j - 1
        if q % 4 == 3 and _is_prime(q):
            return torch.kron(paley(q), sylvester(k - j))
    return None


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """Orthogonal ``diag(s) H / sqrt(n)`` with random signs ``s``.  (n, n) float64"""
    h = hadamard(n)
    if h is None:
        raise QuantsinkError(f"rotate: no Hadamard matrix of order {n} from Paley x Sylvester; "
                             f"this model's size cannot be rotated by a Hadamard matrix")
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h / n ** 0.5


# --------------------------------------------------------------------------- the model's data flow


@torch.no_grad()
def data_flow(model: nn.Module, ids: torch.Tensor) -> dict[str, str]:
    """``{consumer: producer}``: for each leaf module, the leaf module whose output tensor (or a view of it)
    is its first input."""
    made: dict[int, tuple[str, torch.Tensor]] = {}
    fed: dict[str, torch.Tensor] = {}
    leaves = [fqn for fqn, m in model.named_modules() if fqn and not list(m.children())]

    def produced(fqn: str) -> Any:
        return lambda out: made.__setitem__(id(out), (fqn, out)) if torch.is_tensor(out) else None

    def consumed(fqn: str) -> Any:
        return lambda x: fed.__setitem__(fqn, x) if torch.is_tensor(x) else None

    with attach(model, {f"{FQN}{f}": [Hook(produced(f)), Hook(consumed(f), "input")] for f in leaves}):
        model(input_ids=ids, use_cache=False)
    flow = {}
    for fqn, x in fed.items():
        for t in (x, x._base):  # a view (the head reads ``hidden[:, -k:]``) counts as its base
            if t is not None and id(t) in made and made[id(t)][1] is t:
                flow[fqn] = made[id(t)][0]
                break
    return flow


@dataclass
class Plan:
    """What rotation touches, by module name."""

    embedding: str
    head: str
    feeds: dict[str, list[str]]  # norm -> the Linears it feeds (the final norm -> lm_head)
    writers: list[str]  # Linears writing into the residual stream (output rotated in the weights)
    post_norms: list[str]  # norms between a writer and the residual add (output rotated online)
    down: list[str]  # MLP down projections (input rotated online with online=down)


def plan(model: nn.Module, ids: torch.Tensor) -> Plan:
    flow = data_flow(model, ids)
    names = {m: f for f, m in model.named_modules()}
    linears = {f for f, m in model.named_modules() if isinstance(m, nn.Linear)}
    embedding, head = names[model.get_input_embeddings()], names[model.get_output_embeddings()]
    hidden = model.get_input_embeddings().weight.shape[1]
    feeds: dict[str, list[str]] = {}
    for consumer, producer in flow.items():
        if consumer in linears and producer not in linears and producer != embedding:
            feeds.setdefault(producer, []).append(consumer)
    fed = {f for fs in feeds.values() for f in fs}
    writers = [f for f in sorted(linears - fed - {head}) if model.get_submodule(f).out_features == hidden]
    post = sorted(c for c, p in flow.items() if p in writers and c not in linears)
    mlp_inputs = {names[m] for s, m in sites(model).items() if ".mlp." in s and s.endswith(".in")}
    return Plan(embedding, head, feeds, [w for w in writers if w not in {flow.get(p) for p in post}], post,
                [w for w in writers if w in mlp_inputs])


# --------------------------------------------------------------------------- folding


def unit_gain(norm: nn.Module, n: int) -> torch.Tensor:
    """Make ``norm`` an RMSNorm with gain 1 and return the gain it had.  (n,) float64

    The gain is read off the module (``norm(x) / (x / rms(x))``), so ``w`` and ``(1 + w)`` conventions both work;
    a norm that is not an RMSNorm (centring, bias) is refused.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (n,):
        raise QuantsinkError(f"rotate: {type(norm).__name__} feeds a Linear but has no ({n},) gain; not an RMSNorm")
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10 + 3

    def gain() -> torch.Tensor:
        unit = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # (4, n)
        return norm(unit.to(weight.dtype)).double() / unit  # (4, n)

    g = gain()
    if not torch.allclose(g, g[:1].expand_as(g), rtol=1e-3, atol=1e-4):
        raise QuantsinkError(f"rotate: {type(norm).__name__} is not an RMSNorm (its output is not x / rms(x) "
                             f"times a gain); rotation would not be exact")
    g = g.mean(0)
    weight.data = (weight.double() - g + 1).to(weight.dtype)
    return g


def _set(linear: nn.Linear, weight: torch.Tensor) -> None:
    linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)


def online(matrix: torch.Tensor) -> Any:
    """``x -> x @ matrix`` (a hook's function: at an ``output`` hook the output, at an ``input`` hook the input)."""
    return lambda x: x @ matrix.to(x)


def rotate_inputs(model: nn.Module, parts: Plan, q: torch.Tensor, hooks: dict[str, list[Hook]]) -> dict[str, Any]:
    """``gain=keep``: each norm feeding Linears keeps its gain and its output is rotated online (``x -> x Q``);
    the Linears it feeds become ``W Q``.  The residual stream itself is not rotated (nothing else changes)."""
    get = model.get_submodule
    feeds = {norm: linears for norm, linears in parts.feeds.items() if parts.head not in linears}  # head: float
    for norm, linears in feeds.items():
        hooks[f"{FQN}{norm}"] = [Hook(online(q.float()), "output")]
        for f in linears:
            _set(get(f), get(f).weight.double() @ q)
    return {"norms_rotated_online": sorted(feeds), "writers_rotated": 0, "online_residual_rotations": []}


def rotate_model(model: nn.Module, parts: Plan, q: torch.Tensor, hooks: dict[str, list[Hook]]) -> dict[str, Any]:
    """Fuse ``q`` into ``model`` as described in the module doc (in place); the online rotations go into
    ``hooks`` (``{fqn:<path>: [Hook]}``, attached while the model runs); what was done."""
    get = model.get_submodule
    n = q.shape[0]
    head = get(parts.head)
    if head.weight is get(parts.embedding).weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    embedding = get(parts.embedding)
    embedding.weight.data = (embedding.weight.double() @ q).to(embedding.weight.dtype)
    for norm, linears in parts.feeds.items():
        g = unit_gain(get(norm), n)
        for f in linears:
            _set(get(f), get(f).weight.double() * g @ q)
    for f in parts.writers:
        lin = get(f)
        _set(lin, q.T @ lin.weight.double())
        if lin.bias is not None:
            lin.bias.data = (lin.bias.double() @ q).to(lin.bias.dtype)
    for f in parts.post_norms:
        hooks[f"{FQN}{f}"] = [Hook(online(q.float()), "output")]
    return {"norms_folded": sorted(parts.feeds), "writers_rotated": len(parts.writers),
            "online_residual_rotations": parts.post_norms}


def rotate_down(model: nn.Module, parts: Plan, down: torch.Tensor | None, hooks: dict[str, list[Hook]]) -> int:
    """``online=down``: ``x -> x H'`` before every down projection, ``W_down <- W_down H'``; how many."""
    for f in parts.down if down is not None else ():
        _set(model.get_submodule(f), model.get_submodule(f).weight.double() @ down)
        hooks[f"{FQN}{f}"] = [Hook(online(down.float()), "input", prepend=True)]  # before any probe or quantizer
    return len(parts.down) if down is not None else 0


RESIDUAL = {"fold": rotate_model, "keep": rotate_inputs}  # gain= -> how q enters the model


@dataclass(frozen=True)
class Rotate(Mitigation):
    online: Literal["down", "none"] = "down"
    seed: int = 0
    gain: Literal["fold", "keep"] = "fold"

    def check(self, scheme: Any) -> None:
        require_linear_scheme("rotate", scheme)

    @torch.no_grad()
    def prepare(self, model: Any, env: Env) -> Any:
        first = env.calibration().subset(slice(0, 1))
        device = model.get_input_embeddings().weight.device
        ids = first.input_ids.to(device)
        before = model(input_ids=ids, use_cache=False).logits.double()  # (1, T, V)
        parts = plan(model, ids[:, :16])
        gen = torch.Generator().manual_seed(self.seed)
        q = random_hadamard(model.get_input_embeddings().weight.shape[1], gen).to(device)
        down = None
        if self.online == "down" and parts.down:
            down = random_hadamard(model.get_submodule(parts.down[0]).in_features, gen).to(device)
        hooks = env.state["online"] = {}
        done = RESIDUAL[self.gain](model, parts, q, hooks)
        done["online_down_rotations"] = rotate_down(model, parts, down, hooks)
        with attach(model, hooks):
            diff = float((model(input_ids=ids, use_cache=False).logits.double() - before).abs().max())
        scale = float(before.abs().max())
        if diff > TOLERANCE * scale:
            raise QuantsinkError(f"rotate changed the float model's logits by {diff:.3g} (max |logit| {scale:.3g}); "
                                 f"this model's residual stream cannot be rotated exactly")
        env.notes.update(done, seed=self.seed, online=self.online, gain=self.gain, hidden=q.shape[0],
                         float_max_logit_diff=diff, float_max_logit=scale,
                         checked_on="the first calibration window, float model before vs after rotation")
        if not (getattr(env.scheme, "act_bits", None) or getattr(env.scheme, "w_bits", None)):
            env.notes["note"] = ("no-op in effect for the KV cache: the residual rotation leaves k_proj/v_proj "
                                 "outputs unchanged (QuaRot's head-wise K/V Hadamards are not applied)")
        return model

    def attach(self, model: Any, env: Env) -> ContextManager[Any]:
        return attach(model, env.state.get("online", {}))


register(Rotate(name="rotate"), "randomised Hadamard rotation of the residual stream fused into the weights "
         "(QuaRot), plus an online Hadamard before down_proj (online=down|none); gain=keep rotates each norm's "
         "output online instead of folding its gain (for models whose norm gains suppress outlier channels: Gemma 3)")
