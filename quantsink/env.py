"""The process around a run: library chatter, offline mode, and the environment facts behind the numbers.

``quiet_libraries`` only turns logging and progress bars down.  Whether the
Hugging Face hub may be reached is a run option (``RunConfig.offline``, also
on when ``HF_HUB_OFFLINE`` is set); embedded models and corpora never need it.

``facts()`` is what a record keeps of the machine and the libraries that touch its numbers (CPU model and
the instruction sets its kernels pick from, torch's threads and build, the version of every library on the
scoring path); ``differences(a, b)`` says, one line per fact, where two such environments disagree.
``lock_differences`` checks an installed environment against ``requirements/lock.txt`` and ``unlocked``
names what the lock does not hold (``make setup`` runs ``python -P quantsink/env.py unlocked|check-lock
requirements/lock.txt``).  Nothing here imports a heavy
library: versions come from ``importlib.metadata``; torch is asked only when it is already imported.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

TRUE = ("1", "true", "yes", "on")

# every library whose version can move a number: the model, its kernels, tokenization, scoring, peers
SCORING_LIBRARIES = ("torch", "transformers", "numpy", "scipy", "bitsandbytes", "gguf", "safetensors",
                     "tokenizers", "accelerate", "lm-eval", "kernels")
OPTIONAL_LIBRARIES = ("llama-cpp-python", "torchao", "optimum-quanto")  # recorded only when installed
# instruction sets that decide which CPU kernels run (and so the float results they give)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
# variables that change threads or kernel choice
VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
             "LLAMA_ATTN_ROT_DISABLE")
ABSENT = "(not installed)"


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, advisory warnings) off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (the `peers` extra) warns at import that its CUDA-only kernels do not load on a CPU
    # machine, and torch's pytree warns about torchao's enums: neither concerns a quantsink user
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        return
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def offline_from_env() -> bool:
    """Whether the environment asks for offline mode (``HF_HUB_OFFLINE`` truthy)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def go_offline() -> None:
    """From here on no request reaches the hub: the variables huggingface_hub, datasets and transformers
    read when imported (huggingface_hub fetches a registry at start-up unless ``HF_HUB_OFFLINE`` is set
    by then), and, where one is already imported, the constants it read them into."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    datasets = sys.modules.get("datasets.config")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if datasets is not None and hasattr(datasets, name):
            setattr(datasets, name, True)


def offline_requested(argv: Iterable[str]) -> bool:
    """``--offline`` among a command line's arguments (before ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--offline":
            return True
    return False


# --------------------------------------------------------------------------- environment facts

def canonical(name: str) -> str:
    """A distribution name as pip compares them: ``lm_eval`` -> ``lm-eval``, ``PyYAML`` -> ``pyyaml``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Every installed distribution of this interpreter, canonical name -> version (first on sys.path wins)."""
    import importlib.metadata as md

    found: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def cpuinfo_field(cpuinfo: str, field: str) -> str | None:
    """The first ``field : value`` of a ``/proc/cpuinfo`` text, or None."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == field:
            return value.strip()
    return None


def cpu_model(cpuinfo: str) -> str:
    """The CPU's ``model name`` (x86) or ``Model`` (arm); else what ``platform`` knows (``x86_64`` at worst)."""
    name = cpuinfo_field(cpuinfo, "model name") or cpuinfo_field(cpuinfo, "Model")
    return name or platform.processor() or platform.machine() or "unknown"


def cpu_flags(cpuinfo: str) -> list[str] | None:
    """Which of ``CPU_FLAGS`` the CPU has (sorted), or None when the text lists no flags (not Linux x86)."""
    listed = cpuinfo_field(cpuinfo, "flags") or cpuinfo_field(cpuinfo, "Features")
    if listed is None:
        return None
    have = set(listed.split())
    return sorted(f for f in CPU_FLAGS if f in have)


def torch_build(version: str | None, cuda: str | None = None, hip: str | None = None) -> str | None:
    """``cpu``, ``cuda 12.8`` or ``rocm 6.3``: from torch itself when it is imported (``cuda``/``hip``),
    else from the version's local label (``2.13.0+cpu``, ``+cu128``, ``+rocm6.3``).  A bare version
    (PyPI's Linux wheel) is a CUDA build: ``cuda (bare version)``."""
    if version is None:
        return None
    if hip:
        return f"rocm {hip}"
    if cuda:
        return f"cuda {cuda}"
    label = version.partition("+")[2]
    if label == "cpu" or label.startswith("cpu."):
        return "cpu"
    if label.startswith("cu") and label[2:].isdigit():
        digits = label[2:]
        return f"cuda {digits[:-1]}.{digits[-1]}"
    if label.startswith("rocm"):
        return f"rocm {label[4:]}"
    return "cpu" if sys.platform == "darwin" else "cuda (bare version)"


def _torch_runtime() -> dict[str, Any]:
    """What only a loaded torch can say; nothing when torch is not imported yet (it is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    from quantsink.measure.kernels import kernel_name  # torch is loaded already: importing it costs nothing

    out: dict[str, Any] = {"threads": torch.get_num_threads(), "cuda": torch.version.cuda,
                           "hip": getattr(torch.version, "hip", None), "linear_kernel": kernel_name()}
    try:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        pass
    return out


def read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def facts(cpuinfo: str | None = None, versions: Mapping[str, str] | None = None,
          environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The environment facts that touch a run's numbers, as a record keeps them.

    ``cpu_model`` and ``cpu_flags`` (which of ``CPU_FLAGS`` the CPU has: they pick the kernels),
    ``threads`` and ``torch_cpu_capability`` (from torch when it is imported, else None / absent),
    ``torch_build`` (cpu / cuda X.Y / rocm X.Y), ``libraries`` (every ``SCORING_LIBRARIES`` entry, None when
    not installed, plus each installed ``OPTIONAL_LIBRARIES`` entry) and ``variables`` (those of
    ``VARIABLES`` that are set).  The arguments replace what is read from this machine (for tests).
    """
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    have = installed_versions() if versions is None else {canonical(k): v for k, v in versions.items()}
    env = os.environ if environ is None else environ
    runtime = _torch_runtime()
    libraries: dict[str, str | None] = {name: have.get(name) for name in SCORING_LIBRARIES}
    libraries |= {name: have[name] for name in OPTIONAL_LIBRARIES if name in have}
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(info),
        "cpu_flags": cpu_flags(info),
        "threads": runtime.get("threads"),
        "torch_build": torch_build(libraries["torch"], runtime.get("cuda"), runtime.get("hip")),
        "libraries": libraries,
        "variables": {k: env[k] for k in VARIABLES if k in env},
    }
    if "cpu_capability" in runtime:
        out["torch_cpu_capability"] = runtime["cpu_capability"]
    if "linear_kernel" in runtime:  # the float32 CPU matmul of every forward (measure/kernels.py)
        out["linear_kernel"] = runtime["linear_kernel"]
    return out


def _flat(environment: Mapping[str, Any]) -> dict[str, Any]:
    """Nested groups (``libraries``, ``variables``) lifted to the top, so that a record written before them
    (``{"torch": ..., "transformers": ...}`` at the top) compares with one written after."""
    out: dict[str, Any] = {}
    for key, value in environment.items():
        if isinstance(value, Mapping):
            out.update(value)
        else:
            out.setdefault(key, value)
    return out


def _show(value: Any) -> str:
    if value is None:
        return ABSENT
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "(none)"
    return str(value)


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Where two environments (``facts()`` dicts, or older records' flat ones) disagree, one line each.

    A fact both record with different values: ``transformers 5.24.0 vs 5.25.0`` (None shows as
    ``(not installed)``; for ``cpu_flags`` the line names the flags only one side has).  Facts only one
    side records are not called different; they are listed on one closing line per side
    (``only in b: cpu_model, numpy``).  Equal environments give ``[]``.
    """
    fa, fb = _flat(a), _flat(b)
    lines = []
    for key in [k for k in fa if k in fb]:
        x, y = fa[key], fb[key]
        if x == y:
            continue
        if key == "cpu_flags" and isinstance(x, list) and isinstance(y, list):
            only_a, only_b = sorted(set(x) - set(y)), sorted(set(y) - set(x))
            lines.append(f"cpu_flags {_show(only_a)} vs {_show(only_b)}")
        else:
            lines.append(f"{key} {_show(x)} vs {_show(y)}")
    for side, this, other in (("a", fa, fb), ("b", fb, fa)):
        only = [k for k in this if k not in other]
        if only:
            lines.append(f"only in {side}: {', '.join(only)}")
    return lines


# --------------------------------------------------------------------------- the lock

def parse_lock(text: str) -> dict[str, str]:
    """``name==version`` lines of a lock file (comments and blank lines skipped), canonical name -> version."""
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version or any(c in name for c in " <>!~;[@"):
            raise ValueError(f"not an exact pin in the lock: {raw!r}")
        pins[canonical(name)] = version.strip()
    return pins


def lock_differences(pins: Mapping[str, str], installed: Mapping[str, str],
                     loose: Iterable[str] = ("torch",)) -> tuple[list[str], list[str]]:
    """(errors, warnings) of an installed environment against a lock.

    Errors: a locked package missing or at another version.  Warnings: packages the lock does not name
    (a GPU torch's ``nvidia-*``, something installed by hand), and the ``loose`` packages (torch: a GPU
    user installs their own build, ``make setup TORCH_SPEC=...``) at another version.  ``installed``
    should leave out the editable project itself.
    """
    errors, warns = [], []
    for name, version in pins.items():
        have = installed.get(name)
        if have == version:
            continue
        line = f"{name}: locked {version}, installed {have or 'nothing'}"
        (warns if name in loose else errors).append(line)
    warns += [f"{name}: installed {v}, not in the lock" for name, v in sorted(installed.items()) if name not in pins]
    return errors, warns


def requirement_names(requirements: Iterable[str]) -> list[str]:
    """Canonical names a distribution requires, leaving out extras' requirements (markers are not evaluated:
    a platform-specific requirement counts)."""
    names = []
    for req in requirements:
        if re.search(r"\bextra\s*==", req):
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if match:
            names.append(canonical(match.group(1)))
    return names


def installed_requirements() -> dict[str, list[str]]:
    """Every installed distribution's required names (canonical), first on sys.path wins."""
    import importlib.metadata as md

    found: dict[str, list[str]] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), requirement_names(dist.requires or []))
    return found


def unlocked(pins: Mapping[str, str], installed: Iterable[str], requires: Mapping[str, list[str]],
             keep: Iterable[str] = ("torch",)) -> list[str]:
    """Installed packages that neither the lock names nor ``keep`` needs (transitively): what ``make setup``
    removes so that the venv is the lock.  What a user's own torch build needs (a CUDA build's ``nvidia-*``)
    stays."""
    needed, todo = set(), list(keep)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += requires.get(name, [])
    return sorted(n for n in installed if n not in pins and n not in needed)


def _check_lock(path: str, project: str = "quantsink") -> int:
    with open(path, encoding="utf-8") as f:
        pins = parse_lock(f.read())
    installed = {k: v for k, v in installed_versions().items() if k != project}
    errors, warns = lock_differences(pins, installed)
    for line in warns:
        print(f"lock warning: {line}", file=sys.stderr)
    for line in errors:
        print(f"lock error: {line}", file=sys.stderr)
    if not errors:
        print(f"environment matches {path}: {len(pins)} packages" + (f" ({len(warns)} warnings)" if warns else ""))
    return 1 if errors else 0


if __name__ == "__main__":  # python -P quantsink/env.py check-lock|unlocked requirements/lock.txt, or facts
    import json

    if sys.argv[1:2] == ["check-lock"] and len(sys.argv) == 3:
        sys.exit(_check_lock(sys.argv[2]))
    if sys.argv[1:2] == ["unlocked"] and len(sys.argv) == 3:
        with open(sys.argv[2], encoding="utf-8") as lock:
            locked = parse_lock(lock.read())
        have = {k: v for k, v in installed_versions().items() if k != "quantsink"}
        for name in unlocked(locked, have, installed_requirements()):
            print(name)
        sys.exit(0)
    if sys.argv[1:] == ["facts"]:
        print(json.dumps(facts(), indent=1))
        sys.exit(0)
    sys.exit("usage: python -P quantsink/env.py check-lock LOCKFILE | unlocked LOCKFILE | facts")
