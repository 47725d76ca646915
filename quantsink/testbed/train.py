"""Training BB models, with the paper's probes every ``eval_every`` steps, resumable.

``train(TrainConfig(...))`` writes into ``out``:

* an HF model directory (``config.json``, ``model.safetensors``, the character tokenizer) that
  ``quantsink eval --model DIR`` loads; ReLU attention comes back through ``config.json``;
* ``testbed.json``: the resolved config, the task (vocabulary, bigram matrix, triggers) and
  the final probe;
* ``history.json`` / ``history.csv``: the probes over training; ``dynamics.png``: their plots;
* ``heldout.jsonl``: held-out BB sequences (text after ``<s>``), a ``file:`` corpus for
  ``quantsink eval --protocol lm-eval --window <seq_len - 1>`` (each row: ``<s>`` + one sequence);
* ``checkpoint/``: model, optimizer (safetensors) and the data stream's RNG state (JSON),
  swapped in atomically; a second call with the same settings resumes from it.

Data: training batches come from ``numpy.random.default_rng([seed, 0])``, the probe batch
from ``[seed, 1]``, held-out sequences from ``[seed, 2]``; no dropout, so a resumed run
continues the exact same sequence of updates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import QuantsinkError, UsageError
from ..io import atomic_write_text
from ..registry import Registry
from . import probe as P
from .data import BigramBackcopy, build_tokenizer, default_task, write_heldout
from .model import ATTENTIONS, build_config, build_model


@dataclass(frozen=True)
class Preset:
    """Defaults a preset fills in (explicit options win)."""

    batch: dict[int, int]  # layers -> sequences per step (more layers: the key not in the table)
    steps: dict[int, int]  # layers -> steps
    eval_every: int
    probe_batch: int
    heldout: int
    precision: str


PRESETS: Registry[Preset] = Registry("preset")
PRESETS.register("cpu", Preset(batch={1: 32, 3: 16}, steps={1: 800, 3: 600}, eval_every=50, probe_batch=32,
                                heldout=64, precision="bf16"),
                 help="bf16 autocast; 1 layer: batch 32, 800 steps; 3 layers: batch 16, 600 steps "
                      "(each ~15-20 min on a shared 2-core CPU)")
PRESETS.register("paper", Preset(batch={1: 512, 3: 512}, steps={1: 10000, 3: 10000}, eval_every=100, probe_batch=128,
                                 heldout=256,
                                  precision="float32"),
                 help="the paper's batch 512 and 10k steps, float32 (a GPU run)")


def _autocast(device: str, dtype: Any) -> Callable[[], Any]:
    def enter() -> Any:
        import torch

        return torch.autocast(device.split(":")[0], dtype=dtype() if dtype else None, enabled=dtype is not None)
    return enter


def _bf16() -> Any:
    import torch

    return torch.bfloat16


#: ``--precision`` -> (device -> autocast context); weights and optimizer state stay float32
PRECISIONS: Registry[Callable[[str], Callable[[], Any]]] = Registry("precision")
PRECISIONS.register("float32", lambda device: _autocast(device, None), aliases=("fp32",),
                    help="float32 throughout")
PRECISIONS.register("bf16", lambda device: _autocast(device, _bf16), aliases=("bfloat16",),
                    help="bf16 autocast for matmuls (about 3x faster on a CPU with AVX-512 bf16); float32 weights")


@dataclass(frozen=True)
class OptimizerSpec:
    make: Callable[..., Any]
    lr: float
    lr_by_attention: dict[str, float] = field(default_factory=dict)


def _adamw(params: Any, lr: float) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-4)


def _sgd(params: Any, lr: float) -> Any:
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer")
OPTIMIZERS.register("adam", OptimizerSpec(_adamw, 3e-4, {"relu": 3e-3}), aliases=("adamw",),
                    help="AdamW, betas (0.9, 0.99), wd 1e-4, lr 3e-4 (3e-3 with ReLU attention, as the paper's script)")
OPTIMIZERS.register("sgd", OptimizerSpec(_sgd, 0.03), help="SGD, momentum 0.9, wd 1e-4, lr 0.03")


def _opt(help: str) -> dict[str, str]:
    return {"help": help}


@dataclass(frozen=True)
class TrainConfig:
    """One training run; ``None`` fields take the preset's / optimizer's default (see ``resolved``).

    The one parameter list of ``quantsink testbed train``: each field is an option, its help below.
    """

    out: str = field(default="", metadata=_opt("Output directory (HF model, history, plots, checkpoint)."))
    layers: int = field(default=1, metadata=_opt("Transformer layers (the paper: 1 or 3)."))
    attention: str = field(default="softmax", metadata=_opt(
        "softmax | relu (the paper's) | softmax1 | sink-logit (gpt-oss) | gated (arXiv 2505.06708) | softpick "
        "(arXiv 2504.20966); see quantsink.hooks.attention."))
    optimizer: str = field(default="adam", metadata=_opt("adam (AdamW) | sgd, with the paper's settings."))
    steps: int | None = field(default=None, metadata=_opt("Training steps (default: the preset's)."))
    batch: int | None = field(default=None, metadata=_opt("Sequences per step (default: the preset's)."))
    preset: str = field(default="cpu", metadata=_opt("cpu (bf16 autocast; 800 steps of 32 for 1 layer, 600 of 16 "
                                                     "for 3) | paper (batch 512, 10k steps, float32)."))
    seed: int = field(default=0, metadata=_opt("Seed of the initialisation and of the data streams."))
    d: int = field(default=256, metadata=_opt("Hidden size d (MLP 4d)."))
    heads: int = field(default=1, metadata=_opt("Attention heads per layer."))
    lr: float | None = field(default=None, metadata=_opt("Learning rate (default: the optimizer's, as the paper)."))
    eval_every: int | None = field(default=None, metadata=_opt("Probe + checkpoint every N steps."))
    probe_batch: int | None = field(default=None, metadata=_opt("Sequences in the fixed probe batch."))
    heldout: int | None = field(default=None, metadata=_opt("Held-out sequences written to heldout.jsonl."))
    precision: str | None = field(default=None, metadata=_opt("float32 | bf16 (autocast; default: the preset's)."))
    device: str = field(default="auto", metadata=_opt("auto, cpu or cuda[:N]."))
    k: int = field(default=3, metadata=_opt("Triggers: the k most frequent characters."))
    seq_len: int = field(default=256, metadata=_opt("Tokens per sequence, <s> included."))

    def __post_init__(self) -> None:
        checks = [(self.layers >= 1, "--layers must be >= 1 (the paper: 1 or 3)"),
                  (self.steps is None or self.steps >= 0, "--steps must be >= 0"),
                  (self.batch is None or self.batch >= 1, "--batch must be >= 1"),
                  (self.d % self.heads == 0, "--d must be a multiple of --heads"),
                  (self.eval_every is None or self.eval_every >= 1, "--eval-every must be >= 1"),
                  (bool(self.out), "--out DIR is required")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        for registry, value in ((ATTENTIONS, self.attention), (OPTIMIZERS, self.optimizer), (PRESETS, self.preset),
                                (PRECISIONS, self.precision or "float32")):
            registry.canonical(value)

    def resolved(self) -> "TrainConfig":
        """Every default filled in: what the run records and what resuming compares."""
        preset, opt = PRESETS.get(self.preset), OPTIMIZERS.get(self.optimizer)
        attention = ATTENTIONS.canonical(self.attention)
        return dataclasses.replace(
            self, attention=attention, optimizer=OPTIMIZERS.canonical(self.optimizer),
            preset=PRESETS.canonical(self.preset),
            steps=self.steps if self.steps is not None else _by_layers(preset.steps, self.layers),
            batch=self.batch or _by_layers(preset.batch, self.layers), eval_every=self.eval_every or preset.eval_every,
            probe_batch=self.probe_batch or preset.probe_batch, heldout=self.heldout or preset.heldout,
            precision=PRECISIONS.canonical(self.precision or preset.precision),
            lr=self.lr if self.lr is not None else opt.lr_by_attention.get(attention, opt.lr))

    def identity(self) -> dict[str, Any]:
        """What must match to resume (steps may grow, out and device may change)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("steps", "out", "device")}


def _by_layers(table: dict[int, int], layers: int) -> int:
    """A preset's value for ``layers``: its own entry, else the entry of the nearest fewer layers."""
    return table[max([n for n in table if n <= layers] or [min(table)])]


Progress = Callable[[int, int, dict[str, Any] | None], None]  # (step, total, latest summary or None)


class Run:
    """The state of one training run: task, model, optimizer, data stream, history."""

    def __init__(self, config: TrainConfig):
        import torch

        from quantsink.data.models import resolve_device

        self.config = config
        self.device = resolve_device(config.device)
        self.autocast = PRECISIONS.get(config.precision)(self.device)
        self.out = Path(config.out)
        self.task = default_task(k=config.k, seq_len=config.seq_len)
        torch.manual_seed(config.seed)
        self.model = build_model(build_config(self.task, layers=config.layers, d=config.d, heads=config.heads,
                                              attention=config.attention)).to(self.device)
        self.model.train()
        self.optimizer = OPTIMIZERS.get(config.optimizer).make(self.model.parameters(), config.lr)
        self.rng = np.random.default_rng([config.seed, 0])
        self.probe_seqs = torch.as_tensor(self.task.sample(np.random.default_rng([config.seed, 1]),
                                                           config.probe_batch)).to(self.device)  # (P, T+1)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0

    # -- one step, one probe

    def train_step(self) -> float:
        import torch

        seqs = torch.as_tensor(self.task.sample(self.rng, self.config.batch)).to(self.device)  # (B, T+1)
        with self.autocast():
            logits = self.model(seqs[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), seqs[:, 1:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def probe(self) -> dict[str, Any]:
        metrics = P.probe(self.model, self.task, self.probe_seqs)  # float32, whatever the training precision
        row = {"step": self.step, "seconds": round(self.seconds, 2), **metrics}
        self.history.append(row)
        return row


# --------------------------------------------------------------------------- checkpoints (no pickle)


def _optimizer_tensors(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors for safetensors, the JSON-able rest)."""
    import torch

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(run: Run) -> None:
    """Model, optimizer and data-stream state into ``out/checkpoint``, swapped in atomically."""
    from safetensors.torch import save_file

    run.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run.out, prefix=".checkpoint-"))
    tensors, rest = _optimizer_tensors(run.optimizer)
    save_file({k: v.detach().contiguous() for k, v in run.model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": run.step, "seconds": run.seconds, "rng": run.rng.bit_generator.state, "optimizer": rest,
             "config": run.config.identity(), "history": run.history}
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    _swap(tmp, run.out / "checkpoint")


def _swap(new: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def check_out(out: Path) -> None:
    """``--out`` is a folder, or can be made one (one line otherwise, before any training)."""
    from quantsink.io import check_writable_folder

    check_writable_folder(out, f"--out {out}", "give a folder you can write to for the model")


def load_checkpoint(run: Run) -> bool:
    """Resume ``run`` from ``out/checkpoint`` when there is one; False when starting afresh.  A checkpoint
    that cannot be read (truncated, edited) is one line, never a traceback or a half-restored run."""
    where = run.out / "checkpoint"
    if not (where / "state.json").is_file():
        return False
    try:
        return _restore(run, where)
    except QuantsinkError:
        raise
    except Exception as err:  # noqa: BLE001 - JSON, safetensors, shape and key errors mean the same here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise QuantsinkError(f"{where}: corrupt checkpoint ({type(err).__name__}: {first}); delete it to start "
                             f"afresh, or use another --out") from None


def _restore(run: Run, where: Path) -> bool:
    from safetensors.torch import load_file

    state = json.loads((where / "state.json").read_text(encoding="utf-8"))
    if state["config"] != run.config.identity():
        diff = sorted(k for k in state["config"] if state["config"][k] != run.config.identity().get(k))
        raise QuantsinkError(f"{run.out} holds a run with other settings ({', '.join(diff)}): "
                             f"use another --out, or the same settings to resume it")
    run.model.load_state_dict(load_file(str(where / "model.safetensors"), device=str(run.device)))
    run.optimizer.load_state_dict(_optimizer_state(load_file(str(where / "optimizer.safetensors"), device=str(run.device)),
                                                   state["optimizer"]))
    run.rng.bit_generator.state = state["rng"]
    run.step, run.seconds, run.history = state["step"], state["seconds"], state["history"]
    return True


# --------------------------------------------------------------------------- outputs


def export_model(run: Run) -> None:
    """The HF model directory (weights, config, tokenizer) at the top of ``out``, each file atomically."""
    tmp = Path(tempfile.mkdtemp(dir=run.out, prefix=".export-"))
    try:
        run.model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer(run.task).save_pretrained(tmp)
        for path in tmp.iterdir():
            os.replace(path, run.out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_history(run: Run) -> None:
    from .report import history_csv

    atomic_write_text(run.out / "history.json", json.dumps(run.history, indent=1))
    atomic_write_text(run.out / "history.csv", history_csv(run.history))


def write_summary(run: Run, final: dict[str, Any]) -> dict[str, Any]:
    summary = {"steps": run.step, "seconds": round(run.seconds, 1), **P.summary(final)}
    record = {"config": dataclasses.asdict(run.config), "task": run.task.to_dict(), "final": summary,
              "probe_protocol": P.__doc__.strip()}
    atomic_write_text(run.out / "testbed.json", json.dumps(record, indent=1))
    return summary


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train (or resume) the run ``config`` describes; returns the final summary (see ``probe.summary``)."""
    from .report import plot_history

    config = config.resolved()
    check_out(Path(config.out))  # before the model is built
    run = Run(config)
    if not load_checkpoint(run):
        run.probe()
    if run.step > run.config.steps:
        raise QuantsinkError(f"{run.out} is already at step {run.step} > --steps {run.config.steps}: "
                             f"raise --steps or use another --out")
    report = progress or (lambda *_: None)
    report(run.step, run.config.steps, P.summary(run.history[-1]))
    while run.step < run.config.steps:
        started = time.perf_counter()
        run.train_step()
        run.seconds += time.perf_counter() - started
        if run.step % run.config.eval_every == 0 or run.step == run.config.steps:
            row = run.probe()
            save_checkpoint(run)
            write_history(run)
            report(run.step, run.config.steps, P.summary(row))
        else:
            report(run.step, run.config.steps, None)
    save_checkpoint(run)
    export_model(run)
    write_history(run)
    write_heldout(run.task, run.out / "heldout.jsonl", n=run.config.heldout, seed=run.config.seed)
    plot_history(run.history, run.out / "dynamics.png", title=_title(run.config))
    return write_summary(run, run.history[-1])


def _title(config: TrainConfig) -> str:
    return (f"BB, {config.layers} layer(s), {config.attention} attention, {config.optimizer} lr {config.lr:g}, "
            f"batch {config.batch}, {config.precision}")
