"""lm-evaluation-harness on exactly the model quantsink quantized and mitigated.

``quantsink eval --lm-eval python-docs[,python-code,...]`` runs
``lm_eval.simple_evaluate`` with ``HFLM(pretrained=<model object>)`` on the
candidate (mitigations attached) and on the reference, and stores per task under
``candidate.lm_eval.<task>`` / ``reference.lm_eval.<task>``:

* lm-eval's own metrics (``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``
  for the local tasks), with the lm-eval version, the task version and ``max_length``;
* ``quantsink_bits_per_byte``: quantsink's evaluator (``evaluate.run_pass``) on the
  very documents lm-eval scored, with lm-eval's windows (``windows.rolling_windows``),
  and ``bpb_rel_diff`` between the two (they agree to ~1e-8 relative in float32; docs/protocols.md).

Local tasks (``python-docs``, ``python-code``) are lm-eval YAML files shipped in
``quantsink/tasks/`` (package data; ``tasks/`` at the repo root links to it).  Their
data files are generated at run time from ``quantsink.data.corpus`` into
``$QUANTSINK_CACHE/lm_eval_tasks/<task>-v<version>-<corpus sha>-<yaml hash>/`` (deterministic,
never from a hub).  Any other name is looked up among lm-eval's built-in tasks
(wikitext, hellaswag, ...), which need the hub: offline they fail in one line.

Mitigations that change the model's input (``changes_input = True``, e.g. a
prepended sink token) must offer ``wrap_for_lm_eval(model, tokenizer)``, a model
whose ``forward(input_ids)`` applies the change inside and returns logits aligned
with ``input_ids`` (``mitigations.sink_token.prepend_token`` is one for a prepended sink token); otherwise
``--lm-eval`` refuses rather than report an unmitigated number (a test checks that every
registered mitigation overriding ``transform_windows`` declares ``changes_input``).
Mitigations' ``attach`` hooks stay attached while lm-eval runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from quantsink.config import EVALUATOR_VERSION, stable_hash
from quantsink.data.corpus import load_corpus
from quantsink.data.windows import PROTOCOL, document_windows
from quantsink.errors import QuantsinkError, UsageError
from quantsink.io import atomic_write_text, cache_root
from quantsink.registry import Registry

@dataclass(frozen=True)
class LocalTask:
    """A YAML task over an embedded corpus (offline)."""

    name: str
    corpus: str
    local: bool = True

    def record(self) -> dict[str, Any]:
        return {"params": {"corpus": self.corpus, "version": self.config()["metadata"]["version"],
                           "source": "quantsink/tasks"}}

    def text(self) -> str:
        return resources.files("quantsink").joinpath("tasks", f"{self.name}.yaml").read_text(encoding="utf-8")

    def config(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load(self.text())


@dataclass(frozen=True)
class HubTask:
    """An lm-eval built-in task; needs the Hugging Face hub."""

    name: str
    local: bool = False

    def record(self) -> dict[str, Any]:
        return {"params": {"source": "lm-eval built-in (needs the hub)"}}


TASKS: Registry[LocalTask | HubTask] = Registry("lm-eval task")
TASKS.register("python-docs", LocalTask("python-docs", "python-docs"),
               help="loglikelihood_rolling over the python-docs corpus (offline)")
TASKS.register("python-code", LocalTask("python-code", "python-code"),
               help="loglikelihood_rolling over the python-code corpus (offline)")
for _name, _help in (("wikitext", "WikiText-2 document-level perplexity (lm-eval built-in; needs the hub)"),
                     ("hellaswag", "commonsense multiple choice (lm-eval built-in; needs the hub)"),
                     ("lambada_openai", "last-word prediction (lm-eval built-in; needs the hub)"),
                     ("arc_easy", "science multiple choice (lm-eval built-in; needs the hub)")):
    TASKS.register(_name, HubTask(_name), help=_help)


def task_names(text: str) -> list[str]:
    """``"python-docs, wikitext"`` -> names (local names canonicalised, duplicates dropped)."""
    names = [TASKS.canonical(n) if n.strip().lower() in TASKS else n.strip() for n in text.split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise UsageError("--lm-eval needs at least one task name; see `quantsink list tasks`")
    return names


# --------------------------------------------------------------------------- the user's own tasks


def user_tasks(config: Any) -> tuple[list[str], list[str]]:
    """``--lm-eval`` names, each ``.yaml`` path replaced by the task it defines, and the folders lm-eval
    must include for them (``--include-path`` and each YAML's folder) -> (names, folders)."""
    folders = [include_folder(config.include_path)] if config.include_path else []
    names = []
    for name in task_names(config.lm_eval):
        path = Path(name).expanduser()
        if path.suffix.lower() in (".yaml", ".yml"):
            names.append(yaml_task(path))
            folders.append(str(path.resolve().parent))
        else:
            names.append(name)
    return list(dict.fromkeys(names)), list(dict.fromkeys(folders))


def include_folder(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UsageError(f"--include-path {text}: no such folder of lm-eval task YAMLs")
    return str(path.resolve())


def _yaml(path: Path) -> Any:
    """A task YAML as data; lm-eval's tags (``!function utils.process``) read as None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - SafeLoader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"--lm-eval {path}: not a readable task YAML ({type(err).__name__})") from None


def yaml_task(path: Path) -> str:
    """The task name a YAML file defines (its ``task:``)."""
    if not path.is_file():
        raise UsageError(f"--lm-eval {path}: no such task file")
    data = _yaml(path)
    task = data.get("task") if isinstance(data, dict) else None
    if not isinstance(task, str):
        raise UsageError(f"--lm-eval {path}: the YAML names no task (a 'task: NAME' line)")
    return task


def folder_digest(folders: Sequence[str]) -> str:
    """sha of every YAML (and data file beside it) under ``folders``: a changed task is not served from cache."""
    files = sorted(f for folder in folders for f in Path(folder).rglob("*") if f.is_file())
    return stable_hash([(str(f), hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]) if files else ""


# --------------------------------------------------------------------------- task files


def materialize(task: LocalTask) -> Path:
    """Write the task's YAML and JSONL data under the cache; return the directory.

    The directory name pins the task version, the corpus sha256 and the YAML's
    hash, so a file, once written, never changes; rewriting it gives the same bytes.
    """
    import yaml

    config = task.config()
    corpus = load_corpus(config["metadata"]["quantsink"]["corpus"])
    version = config["metadata"]["version"]
    key = f"{task.name}-v{version}-{corpus.sha256[:12]}-{stable_hash(task.text(), length=8)}"
    folder = cache_root() / "lm_eval_tasks" / key
    data = folder / f"{task.name}.jsonl"
    spec = folder / f"{task.name}.yaml"
    if spec.is_file() and data.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in corpus.documents))
    config["dataset_kwargs"]["data_files"]["test"] = str(data)
    config["metadata"]["quantsink"]["corpus_sha256"] = corpus.sha256
    atomic_write_text(spec, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return folder


def task_manager(names: Sequence[str], include: Sequence[str] = ()) -> Any:
    """An lm-eval TaskManager that knows the local tasks, the user's (``include``: folders of YAMLs) and
    the built-ins when a name needs them."""
    from lm_eval.tasks import TaskManager

    local = [entry.obj for entry in TASKS if entry.obj.local]
    theirs = {_yaml(f).get("task") for folder in include for f in Path(folder).rglob("*.y*ml")
              if isinstance(_yaml(f), dict)}
    hub = any(n not in theirs and (n not in TASKS or not TASKS.get(n).local) for n in names)
    return TaskManager(include_path=[str(materialize(t)) for t in local] + list(include), include_defaults=hub)


def load_tasks(names: Sequence[str], manager: Any) -> dict[str, Any]:
    """lm-eval Task objects by name; unknown names and unreachable hub data fail in one line."""
    check_known(names, manager)
    try:
        with _quiet():
            return manager.load(list(names))["tasks"]
    except Exception as err:  # noqa: BLE001 - a data set that cannot be fetched means the same to the user
        hub = [n for n in names if not (n in TASKS and TASKS.get(n).local)]
        raise QuantsinkError(
            f"lm-eval task {', '.join(hub) or ', '.join(names)!s} could not load its data "
            f"({type(err).__name__}); hub tasks need the Hugging Face hub (unreachable offline); "
            f"offline tasks: python-docs, python-code") from None


def check_known(names: Sequence[str], manager: Any) -> None:
    """Every name is a task ``manager`` knows; else a usage error naming the closest one."""
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown lm-eval task {unknown[0]!r}.{hint} Local tasks: "
                         f"{', '.join(e.name for e in TASKS if e.obj.local)}; see `quantsink list tasks`; "
                         f"your own: --include-path DIR, or --lm-eval path/to/task.yaml")


# --------------------------------------------------------------------------- mitigations



def lm_eval_model(model: Any, tokenizer: Any, mitigations: Sequence[Any]) -> Any:
    """The model lm-eval should see: input-changing mitigations wrapped in, or a refusal."""
    for mitigation in mitigations:
        if not mitigation.changes_input:
            continue
        wrap = mitigation.wrap_for_lm_eval
        wrapped = wrap(model, tokenizer) if wrap is not None and model is not None else None
        if wrapped is None:
            raise QuantsinkError(
                f"--lm-eval cannot apply mitigation {mitigation.name!r}: it changes the model's input and "
                f"offers no model wrapper lm-eval would see, so lm-eval would score the unmitigated model; "
                f"drop --lm-eval or that mitigation")
        model = wrapped
    return model


def check(names: Sequence[str], mitigations: Sequence[Any], include: Sequence[str] = ()) -> None:
    """Fail fast (before any model pass) on task names and mitigations lm-eval cannot see."""
    for mitigation in mitigations:
        if mitigation.changes_input and mitigation.wrap_for_lm_eval is None:
            lm_eval_model(None, None, [mitigation])
    for name in names:
        if name in TASKS and TASKS.get(name).local:
            TASKS.get(name).config()
    if any(name not in TASKS for name in names):  # lm-eval's own registry (indexing it takes seconds)
        with _quiet():
            check_known(names, task_manager(names, include))


def check_config(config: Any, mitigations: Sequence[Any]) -> None:
    """``check`` on a RunConfig's ``--lm-eval`` (YAML paths and ``--include-path`` resolved)."""
    names, include = user_tasks(config)
    check(names, mitigations, include)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's and datasets' logs and progress bars off the user's terminal for the duration
    (their tqdm bars ignore logging levels, so stderr is captured; errors still raise)."""
    import io

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def rows_per_batch(batch_tokens: int, length: int) -> int:
    """Windows per forward: what ``evaluate.batches`` gives quantsink's rows of ``length + 1``."""
    return max(1, batch_tokens // (length + 1))


def simple_evaluate(model: Any, tokenizer: Any, tasks: dict[str, Any], manager: Any, *, limit: int | None,
                    max_length: int, batch_rows: int) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with ``HFLM(pretrained=model)``; the raw results dict."""
    from lm_eval import simple_evaluate as evaluate
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=max_length,
                  batch_size=batch_rows)
        return evaluate(model=lm, tasks=list(tasks.values()), task_manager=manager, limit=limit,
                        bootstrap_iters=0, log_samples=True)


def scored_documents(results: dict[str, Any], task: str) -> list[str]:
    """The texts lm-eval scored for a rolling task, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: int(s["doc_id"]))
    return [s["arguments"][0][0] if "arguments" in s else s["doc"]["text"] for s in samples]


def scored_bytes(results: dict[str, Any], task: str) -> int | None:
    """The UTF-8 bytes lm-eval divided by (its per-document ``bits_per_byte`` items), or None.

    For the local tasks these are the bytes of the scored text; a hub task may count
    other bytes (wikitext counts the page before detokenization)."""
    try:
        return sum(int(s["bits_per_byte"][1]) for s in results["samples"][task])
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def task_result(results: dict[str, Any], task: str) -> dict[str, Any]:
    """lm-eval's metrics for one task (``metric,filter`` keys -> metric names)."""
    import lm_eval

    metrics = {k.split(",")[0]: v for k, v in results["results"][task].items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return {**metrics, "task_version": results["versions"].get(task),
            "lm_eval_version": lm_eval.__version__,
            "n_documents": int(results.get("n-samples", {}).get(task, {}).get("effective", 0))}


def quantsink_bpb(model: Any, tokenizer: Any, texts: Sequence[str], *, length: int, batch_tokens: int,
                  nbytes: int | None = None, mitigations: Any = None) -> dict[str, Any]:
    """quantsink's evaluator on lm-eval's documents and windows (the run's ``MitigationStack``
    windows applied).

    ``nbytes``: the byte count lm-eval used (default: the bytes of ``texts``), so the two
    bits-per-byte figures share their denominator and differ only by the summed NLL."""
    from quantsink.measure.passes import run_pass

    windows = document_windows(texts, tokenizer, length)
    if mitigations is not None:
        windows = mitigations.windows(windows)
    result = run_pass(model, windows, batch_tokens=batch_tokens)
    nll = float(result.nll.sum())
    return {"quantsink_bits_per_byte": nll / math.log(2) / float(nbytes or result.nbytes.sum()),
            "quantsink_nll": nll, "quantsink_seconds": result.seconds, "quantsink_tokens": windows.n_tokens}


def evaluate_model(model: Any, tokenizer: Any, names: Sequence[str], *, limit: int | None, max_length: int,
                   batch_tokens: int, mitigations: Any = None, include: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per task: lm-eval's metrics and, for rolling tasks, quantsink's bits per byte on the same documents."""
    import time

    manager = task_manager(names, include)
    tasks = load_tasks(names, manager)
    seen = lm_eval_model(model, tokenizer, mitigations.mitigations if mitigations is not None else [])
    with mitigations.attach(model) if mitigations is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        results = simple_evaluate(seen, tokenizer, tasks, manager, limit=limit, max_length=max_length,
                                  batch_rows=rows_per_batch(batch_tokens, max_length))
        seconds = time.perf_counter() - t0
        out = {}
        for name, task in tasks.items():
            entry = {**task_result(results, name), "max_length": max_length, "limit": limit,
                     "lm_eval_seconds_all_tasks": seconds, "protocol": PROTOCOL}
            if task.OUTPUT_TYPE == "loglikelihood_rolling" and "bits_per_byte" in entry:
                entry.update(quantsink_bpb(model, tokenizer, scored_documents(results, name), length=max_length,
                                           batch_tokens=batch_tokens, nbytes=scored_bytes(results, name),
                                           mitigations=mitigations))
                entry["bpb_rel_diff"] = entry["quantsink_bits_per_byte"] / entry["bits_per_byte"] - 1
            out[name] = entry
    return out


# --------------------------------------------------------------------------- in a run


def reference_cached(prep: Any, names: Sequence[str], include: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], bool]:
    """The reference's lm-eval results, from the disk cache when present (-> results, cached?)."""
    import lm_eval

    config = prep.config
    key = stable_hash(prep.loaded.info.sha256, str(prep.loaded.device), config.dtype, sorted(names),
                      [TASKS.get(n).record() if n in TASKS else n for n in names], config.lm_eval_limit,
                      config.window, lm_eval.__version__, EVALUATOR_VERSION,
                      *([folder_digest(include)] if include else []), length=24)
    path = cache_root() / "lm_eval" / f"{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if set(cached) == set(names):
                return cached, True
        except (json.JSONDecodeError, OSError):
            pass  # unreadable: recompute
    result = evaluate_model(prep.loaded.model, prep.loaded.tokenizer, names, limit=config.lm_eval_limit,
                            max_length=config.window, batch_tokens=config.batch_tokens, include=include)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result, False


def announce_cost(prep: Any, names: Sequence[str]) -> None:
    """Before any lm-eval pass, without ``--lm-eval-limit``: a one-line warning of how much each
    task scores (lm-eval scores whole tasks, whatever ``--max-tokens`` says) and how to limit it.
    Local tasks: documents and tokens estimated from the bytes per token of this run's windows."""
    config = prep.config
    if config.lm_eval_limit is not None:
        return
    per_token = float(prep.windows.nbytes.sum()) / max(prep.windows.n_scored, 1)  # bytes per token
    for name in names:
        if not (name in TASKS and TASKS.get(name).local):
            warnings.warn(f"--lm-eval {name}: scores every document of the task on each model; "
                          f"--lm-eval-limit N scores the first N", stacklevel=2)
            continue
        tokens = list(itertools.accumulate(len(d.encode("utf-8")) / per_token
                                           for d in load_corpus(TASKS.get(name).corpus).documents))
        if tokens[-1] > config.max_tokens:
            fit = max(1, sum(t <= config.max_tokens for t in tokens))
            warnings.warn(f"--lm-eval {name}: scores all {len(tokens)} documents (~{tokens[-1]:,.0f} tokens, "
                          f"{tokens[-1] / config.max_tokens:.0f}x --max-tokens) on each model; "
                          f"--lm-eval-limit {fit} stays within --max-tokens", stacklevel=2)


def evaluate_run(prep: Any, candidate: Any) -> dict[str, Any]:
    """Both sides of a run: ``{"reference": {task: ...}, "candidate": {task: ...}, "reference_cached": bool}``."""
    names, include = user_tasks(prep.config)
    announce_cost(prep, names)
    reference, cached = reference_cached(prep, names, include)
    cand = evaluate_model(candidate, prep.loaded.tokenizer, names, limit=prep.config.lm_eval_limit,
                          max_length=prep.config.window, batch_tokens=prep.config.batch_tokens,
                          mitigations=prep.mitigations, include=include)
    return {"reference": reference, "candidate": cand, "reference_cached": cached}


# --------------------------------------------------------------------------- lm-eval's results format

#: what an entry of ``record.<side>.lm_eval[task]`` holds beside lm-eval's metrics
NOT_METRICS = {"task_version", "lm_eval_version", "n_documents", "max_length", "limit", "lm_eval_seconds_all_tasks",
               "protocol", "bpb_rel_diff"}


def results_json(record: Any, side: str) -> dict[str, Any]:
    """One side of a run's lm-eval results in lm-eval's own results format (``results``, ``versions``,
    ``n-samples``, ``config``; metric keys ``<metric>,none``), with quantsink's cross-check beside it."""
    tasks = getattr(record, side).lm_eval or {}
    c = record.config
    metric = {t: {k: v for k, v in e.items() if k not in NOT_METRICS and not k.startswith("quantsink_")}
              for t, e in tasks.items()}
    return {"results": {t: {"alias": t, **{f"{k},none": v for k, v in m.items()}} for t, m in metric.items()},
            "versions": {t: e.get("task_version") for t, e in tasks.items()},
            "n-samples": {t: {"effective": e.get("n_documents")} for t, e in tasks.items()},
            "config": {"model": f"{record.model.name} {c.scheme} + {c.mitigation} ({side})",
                       "model_sha256": record.model.sha256, "limit": c.lm_eval_limit,
                       "max_length": c.window, "include_path": c.include_path or None},
            "lm_eval_version": next((e.get("lm_eval_version") for e in tasks.values()), None),
            "quantsink": {"run_id": record.run_id, "side": side,
                          "bits_per_byte": {t: e.get("quantsink_bits_per_byte") for t, e in tasks.items()}}}


def write_results(record: Any, results: str | Path) -> list[Path]:
    """``<results>/lm_eval/<run_id>.{candidate,reference}.json`` in lm-eval's results format (a sub-folder:
    the store's own folder holds only records); none when the run ran no lm-eval task."""
    if not record.candidate.lm_eval:
        return []
    paths = []
    for side in ("candidate", "reference"):
        paths.append(Path(results) / "lm_eval" / f"{record.run_id}.{side}.json")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths[-1], json.dumps(results_json(record, side), indent=1) + "\n")
    return paths
