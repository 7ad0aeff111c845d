#!/usr/bin/env bash
# GPU benchmark of the paper's step (issue 5): cifar10-gbrcl (ResNet-18, PGD-7, ASAM on the benign
# term, critic in the attack) at batch 512 -- fp32 vs bf16+channels-last vs bf16+channels-last+
# torch.compile: images/s, fraction of the same-dtype torch.mm peak, peak memory, and the projected
# CIFAR-10 epoch time (50000 / images/s). Each case runs in its own process under `timeout`, so a
# slow compile cannot eat the budget; the whole script stays under 5 minutes.
#
#   bash benchmarks/gpu.sh                            # on the lent GPU; JSON to $OUT (else a new temp dir)
#   DEVICE=cpu SMALL=1 OUT=/tmp/x bash benchmarks/gpu.sh   # flow check on a CPU: tiny smoke config, 1 step
#
# Runs from the source tree (PYTHONPATH=<repo>, robustcl not installed) with `python -m robustcl bench`,
# which needs only torch, pyyaml and numpy (no tqdm, safetensors or matplotlib). Without network, missing
# modules come from wheels in wheels/ (or $WHEELS), installed with pip --no-index into a temp dir put on
# PYTHONPATH. Fetch them beforehand on a networked machine for the GPU box's Python and platform, e.g.:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels/ pyyaml numpy
#
# Knobs (environment): PYTHON (python3), DEVICE (cuda), BATCH (512), STEPS (10), WARMUP (3),
# EAGER_TIMEOUT (55 s per eager case), COMPILE_TIMEOUT (170 s), COMPILE_BACKEND (inductor),
# REQUIRED_MODULES ("torch yaml numpy"), WHEELS (<repo>/wheels), CHECK_ONLY=1 (dependencies only, then exit),
# DRY_RUN=1 (print the three bench commands instead of running them).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${SMALL:-0}" == "1" ]]; then   # seconds on a CPU: the same flow on a tiny config
  CONFIG=smoke
  OVERRIDES=(data.synthetic.size=8 "model.widths=[4,4]" method.attack.steps=1 train.threads=1)
  BATCH="${BATCH:-8}" STEPS="${STEPS:-1}" WARMUP="${WARMUP:-0}" GEMM=(--gemm-size 64)
  COMPILE_BACKEND="${COMPILE_BACKEND:-eager}"
else
  CONFIG=cifar10-gbrcl
  OVERRIDES=()
  BATCH="${BATCH:-512}" STEPS="${STEPS:-10}" WARMUP="${WARMUP:-3}" GEMM=()
  COMPILE_BACKEND="${COMPILE_BACKEND:-inductor}"
fi
EAGER_TIMEOUT="${EAGER_TIMEOUT:-55}"
COMPILE_TIMEOUT="${COMPILE_TIMEOUT:-170}"

# ---------------------------------------------------------------- dependencies
missing_modules() {  # the modules of $@ that $PY cannot find (find_spec: nothing is imported)
  "$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}
REQUIRED="${REQUIRED_MODULES:-torch yaml numpy}"
missing="$(missing_modules $REQUIRED)"
if [[ -n "$missing" ]]; then
  WHEELS="${WHEELS:-$ROOT/wheels}"
  packages=()
  for module in $missing; do
    case "$module" in yaml) packages+=(pyyaml) ;; *) packages+=("$module") ;; esac
  done
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu.sh: missing Python modules: $missing; no wheels in $WHEELS to install them from (see the pip download line at the top of this script)" >&2
    exit 1
  fi
  DEPS="$(mktemp -d "${TMPDIR:-/tmp}/robustcl-deps.XXXXXX")"
  echo "gpu.sh: installing ${packages[*]} from $WHEELS into $DEPS" >&2
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$DEPS" "${packages[@]}" >&2
  export PYTHONPATH="$DEPS:$PYTHONPATH"
  missing="$(missing_modules $REQUIRED)"
  if [[ -n "$missing" ]]; then
    echo "gpu.sh: still missing after installing from $WHEELS: $missing" >&2
    exit 1
  fi
fi
optional="$(missing_modules tqdm safetensors matplotlib)"
[[ -z "$optional" ]] || echo "gpu.sh: note: not installed, not needed by the bench: $optional" >&2
echo "gpu.sh: modules found: $REQUIRED; PYTHONPATH=$PYTHONPATH" >&2
if [[ "${CHECK_ONLY:-0}" == "1" ]]; then
  exit 0
fi

# ---------------------------------------------------------------- the three cases
OUT_DIR="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/robustcl-gpu-bench.XXXXXX")}"
mkdir -p "$OUT_DIR"
declare -A STATUS
run_case() {  # name timeout bench-args...
  local name="$1" limit="$2"
  shift 2
  local rc=0
  local cmd=(timeout -k 10 "$limit" "$PY" -m robustcl bench "${OVERRIDES[@]}" --config "$CONFIG" --device "$DEVICE"
             --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" "${GEMM[@]}" --json "$OUT_DIR/case_$name.json" "$@")
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    STATUS[$name]="dry run"
    return
  fi
  echo "gpu.sh: case $name (timeout ${limit}s)" >&2
  "${cmd[@]}" || rc=$?
  case "$rc" in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="timed out after ${limit}s" ;;
    *) STATUS[$name]="failed with exit code $rc" ;;
  esac
}
SECONDS=0
run_case fp32 "$EAGER_TIMEOUT" --precision fp32 --no-channels-last
run_case bf16_cl "$EAGER_TIMEOUT" --precision bf16 --channels-last
run_case bf16_cl_compile "$COMPILE_TIMEOUT" --precision bf16 --channels-last --compile --compile-backend "$COMPILE_BACKEND"

# ---------------------------------------------------------------- summary
STATUS_JSON="{\"fp32\": \"${STATUS[fp32]}\", \"bf16_cl\": \"${STATUS[bf16_cl]}\", \"bf16_cl_compile\": \"${STATUS[bf16_cl_compile]}\"}"
"$PY" - "$OUT_DIR" "$STATUS_JSON" "$SECONDS" "$CONFIG" <<'EOF'
import json, os, sys, tempfile
out_dir, status, seconds, config = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
EPOCH_IMAGES = 50000  # CIFAR-10's training set
cases = {}
for name in status:
    path = os.path.join(out_dir, f"case_{name}.json")
    if status[name] == "ok" and os.path.isfile(path):
        with open(path) as fh:
            report = json.load(fh)
        r = report["results"][0]
        cases[name] = {**r, "epoch_s_projected": EPOCH_IMAGES / r["images_per_s"],
                       "cuda_device": report["cuda_device"], "torch": report["torch"]}
summary = {"schema": "robustcl.gpu-bench/1", "config": config, "status": status, "seconds": seconds,
           "epoch_images": EPOCH_IMAGES, "cases": cases}
if "fp32" in cases:
    summary["speedup_vs_fp32"] = {k: v["images_per_s"] / cases["fp32"]["images_per_s"] for k, v in cases.items()}
fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".gpu_bench.json.")
with os.fdopen(fd, "w") as fh:
    json.dump(summary, fh, indent=2)
os.replace(tmp, os.path.join(out_dir, "gpu_bench.json"))
print(f"{'case':16s} {'status':22s} {'images/s':>9s} {'epoch s':>8s} {'of peak':>8s} {'GEMM peak':>10s} {'peak MiB':>9s} {'compile s':>9s}")
for name, state in status.items():
    r = cases.get(name)
    if r is None:
        print(f"{name:16s} {state:22s}")
        continue
    state = "ok" if not r["compile_error"] else "compile FAILED (eager)"
    compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-"
    print(f"{name:16s} {state:22s} {r['images_per_s']:9.1f} {r['epoch_s_projected']:8.1f} {(r['fraction_of_peak'] or float('nan')):8.3f} "
          f"{r['gemm_peak_gflops']:10.0f} {r['peak_memory_mib']:9.0f} {compile_s:>9s}")
    if r["compile_error"]:
        print(f"  compile error: {r['compile_error']}")
print(f"{seconds} s in all; summary: {os.path.join(out_dir, 'gpu_bench.json')}")
EOF
