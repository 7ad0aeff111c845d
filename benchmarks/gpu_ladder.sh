#!/usr/bin/env bash
# The ablation ladder on one GPU (issue 14): Fashion-MNIST resized to 32x32, ResNet-18 (CIFAR stem), the four
# rungs of `fmnist32-resnet18-ladder` (adversarial InfoNCE only, + benign term, + ASAM, + critic) x 3 seeds,
# each pretrain -> SLF/ALF -> PGD-20 evaluation with the integrity checks, then the sweep's summary (means,
# 95% t-intervals over seeds, paired differences to adv-only; docs/statistics.md). Sized for <= 8 minutes on
# one H200; a wall-clock guard stops it in time and the summary covers the seeds that finished.
#
#   PREPARE=1 bash benchmarks/gpu_ladder.sh       # here: copy Fashion-MNIST's four .gz files into data/fashion-mnist
#   bash benchmarks/gpu_ladder.sh                 # on the GPU machine: no download, reads data/fashion-mnist only
#   DEVICE=cpu SMALL=1 OUT=/tmp/x bash benchmarks/gpu_ladder.sh   # flow check on a CPU at a tiny size
#
# Data: read from $DATA_ROOT (default <repo>/data/fashion-mnist, git-ignored: carry it to the GPU machine), with
# data.root set explicitly so nothing else is searched and nothing is downloaded, and md5-verified on load.
#
# Size estimate (defaults: 150 phase-1 steps of batch 512, PGD-20 on 2,000 test images). FLOPs per image
# measured here with `python -m robustcl bench 'data.options={size: 32}' model.arch=resnet18
# views.weak.padding=4 --config <rung> --batch-size 4 --steps 1` (torch's flop formulas): a forward pass of
# the 1-channel ResNet-18 at 32 px is 1.11 GFLOP; a phase-1 step costs 11.9 / 14.6 / 23.7 / 25.5 GFLOP per
# image for adv-only / +benign / +sam / +critic (mean 18.9). Per run: phase 1 150 x 512 x 18.9 GFLOP = 1.45
# PFLOP (bf16); phase 2 about 0.3 PFLOP (SLF features of 60k images, ALF PGD-10 on 3,000 images x 4 epochs);
# evaluation per protocol about 112 forward-equivalents per test image (PGD-20, the PGD-5 and eps-0 and
# eps-0.5 checks; an input-gradient step is about 1.65 forwards) plus Square on <= 200 images (<= 0.25 PFLOP),
# i.e. 2 x (2,000 x 125 GFLOP + 0.25 PFLOP) = 1.0 PFLOP (fp32, TF32 convolutions). An H200 peaks at 989
# TFLOPS dense bf16 and 495 TF32; eager ResNet-18 at 32 px reaches perhaps 15% of that (an assumption, not a
# measurement: ~150 TFLOPS bf16, ~75 TF32), so about 10 + 4 + 13 = 27 s of GPU work per run, 12 runs 330 s,
# plus ~90 s of process start-up, data loading and report writing: ~7 minutes. If the GPU is 1.5x slower than
# assumed, the guard (BUDGET_S) ends the last seed early and the summary has seeds 0 and 1.
#
# Knobs (environment): PYTHON (python3), DATA_ROOT, OUT (results; else a new temp dir), SEEDS ("0 1 2"),
# STEPS (150), EVAL_LIMIT (2000), JOBS (2: runs sharing the GPU, overlapping their CPU work), BUDGET_S (480),
# RESERVE_S (30, kept for the summary), DEVICE (auto), SMALL=1 (a CPU flow check: tiny sizes, and a tiny ConvNet
# in place of ResNet-18, which alone takes minutes per run on a CPU),
# KEEP_RUNS=1 (keep the run directories with checkpoints under $OUT; else only the light files come back),
# BOUND=1 (also `robustcl bound --sweep` on the finished runs, if time is left), WHEELS (<repo>/wheels).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SPEC=fmnist32-resnet18-ladder
DATA_ROOT="${DATA_ROOT:-$ROOT/data/fashion-mnist}"

# ---------------------------------------------------------------- prepare (on the machine that has the data)
if [[ "${PREPARE:-0}" == "1" ]]; then
  "$PY" - "$DATA_ROOT" <<'EOF'
import shutil, sys
from pathlib import Path
from robustcl.data import locate_dataset, verify_files
dest = Path(sys.argv[1])
source = locate_dataset("fashion-mnist")
dest.mkdir(parents=True, exist_ok=True)
for path in verify_files("fashion-mnist", source):
    shutil.copy2(path, dest / path.name)
print(f"gpu_ladder.sh: {len(verify_files('fashion-mnist', dest))} md5-checked files from {source} in {dest}")
EOF
  exit 0
fi

# ---------------------------------------------------------------- dependencies (as benchmarks/gpu.sh)
missing_modules() {
  "$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}
REQUIRED="torch yaml numpy safetensors tqdm matplotlib PIL pyautoattack"
missing="$(missing_modules $REQUIRED)"
if [[ -n "$missing" ]]; then
  WHEELS="${WHEELS:-$ROOT/wheels}"
  packages=()
  for module in $missing; do
    case "$module" in yaml) packages+=(pyyaml) ;; PIL) packages+=(pillow) ;; pyautoattack) packages+=(pyautoattack) ;;
                      *) packages+=("$module") ;; esac
  done
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_ladder.sh: missing Python modules: $missing; no wheels in $WHEELS (on a networked machine: pip download --only-binary=:all: --python-version 3.X --platform manylinux2014_x86_64 -d wheels/ ${packages[*]})" >&2
    exit 1
  fi
  DEPS="$(mktemp -d "${TMPDIR:-/tmp}/robustcl-deps.XXXXXX")"
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$DEPS" "${packages[@]}" >&2
  export PYTHONPATH="$DEPS:$PYTHONPATH"
  missing="$(missing_modules $REQUIRED)"
  [[ -z "$missing" ]] || { echo "gpu_ladder.sh: still missing after installing from $WHEELS: $missing" >&2; exit 1; }
fi

# ---------------------------------------------------------------- data: the carried copy only
if ! "$PY" -c 'import sys; from robustcl.data import verify_files; verify_files("fashion-mnist", sys.argv[1])' "$DATA_ROOT" 2>/dev/null; then
  echo "gpu_ladder.sh: Fashion-MNIST not found (or corrupt) in $DATA_ROOT; run PREPARE=1 bash benchmarks/gpu_ladder.sh where it is installed and carry that folder here (or set DATA_ROOT)" >&2
  exit 1
fi

# ---------------------------------------------------------------- sizes
if [[ "${SMALL:-0}" == "1" ]]; then SEEDS="${SEEDS:-0 1}" STEPS="${STEPS:-2}" EVAL_LIMIT="${EVAL_LIMIT:-16}"; fi
SEEDS="${SEEDS:-0 1 2}"
STEPS="${STEPS:-150}"
EVAL_LIMIT="${EVAL_LIMIT:-2000}"
JOBS="${JOBS:-2}"
BUDGET_S="${BUDGET_S:-480}"
RESERVE_S="${RESERVE_S:-30}"
OVERRIDES=("data.root=$DATA_ROOT" "data.options={size: 32, verify: true}" "train.max_steps=$STEPS"
           "eval.limit=$EVAL_LIMIT" "eval.batch_size=1000" "train.device=${DEVICE:-auto}")
if [[ "${SMALL:-0}" == "1" ]]; then   # seconds per run on a CPU: the same flow at a tiny size, a tiny ConvNet for ResNet-18
  OVERRIDES+=(model.arch=convnet "model.widths=[8,8,16,16]" train.batch_size=8 data.train_limit=64 diagnostics.every=0 train.threads=1 eval.batch_size=16
              finetune.epochs=1 finetune.train_limit=64 finetune.val_limit=16 finetune.alf_train_limit=16
              finetune.batch_size=16 "finetune.attack.steps=1" "eval.attack.steps=2" "method.attack.steps=1")
fi
OUT_DIR="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/robustcl-gpu-ladder.XXXXXX")}"
mkdir -p "$OUT_DIR"
if [[ "${KEEP_RUNS:-0}" == "1" ]]; then
  SWEEP="$OUT_DIR/$SPEC"
else   # checkpoints (~45 MB a run) stay here; the light files are copied to $OUT at the end
  SWEEP="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/robustcl-ladder-runs.XXXXXX")}/$SPEC"
fi
echo "gpu_ladder.sh: $SPEC, seeds $SEEDS, $STEPS steps, $EVAL_LIMIT test images, $JOBS jobs, budget ${BUDGET_S}s; runs in $SWEEP" >&2

# ---------------------------------------------------------------- the ladder, one seed at a time
SECONDS=0
declare -A STATUS SEED_S
for seed in $SEEDS; do   # seed-major: a budget cut leaves whole seeds, every rung of each
  left=$((BUDGET_S - RESERVE_S - SECONDS))
  if (( left < 30 )); then STATUS[$seed]="skipped (budget)"; SEED_S[$seed]=0; continue; fi
  start=$SECONDS rc=0
  timeout -s INT -k 20 "$left" "$PY" -m robustcl sweep --spec "$SPEC" --out "$SWEEP" --seeds "$seed" --jobs "$JOBS" \
    --quiet "${OVERRIDES[@]}" >&2 || rc=$?
  SEED_S[$seed]=$((SECONDS - start))
  case "$rc" in 0) STATUS[$seed]=ok ;; 124|130|137) STATUS[$seed]="stopped at the budget" ;; *) STATUS[$seed]="failed ($rc)" ;; esac
  echo "gpu_ladder.sh: seed $seed: ${STATUS[$seed]} in ${SEED_S[$seed]} s" >&2
done
LADDER_S=$SECONDS

if [[ "${BOUND:-0}" == "1" ]] && (( BUDGET_S - SECONDS > 60 )); then
  timeout -s INT -k 20 $((BUDGET_S - SECONDS - 20)) "$PY" -m robustcl bound --sweep "$SWEEP" --quiet >&2 || true
fi

# ---------------------------------------------------------------- the summary over every finished run
status_json="{"
for seed in $SEEDS; do status_json+="\"$seed\": [\"${STATUS[$seed]}\", ${SEED_S[$seed]}], "; done
status_json="${status_json%, }}"
"$PY" - "$SWEEP" "$OUT_DIR" "$SPEC" "$status_json" "$LADDER_S" "$SEEDS" "${OVERRIDES[@]}" <<'EOF'
import json, shutil, sys
from pathlib import Path
from robustcl.runs import atomic_write_text
from robustcl.sweep import plan_sweep, write_summary
sweep, out, spec, status, ladder_s, seeds, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3], \
    json.loads(sys.argv[4]), int(sys.argv[5]), [int(s) for s in sys.argv[6].split()], sys.argv[7:]
plan = plan_sweep(spec, sweep, overrides, seeds=seeds)
summary = write_summary(plan)
light = out / spec
if Path(sweep).resolve() != light.resolve():  # only what is small comes back: no checkpoints or encoders
    for path in Path(sweep).rglob("*"):
        rel = path.relative_to(sweep)
        if path.is_file() and rel.parts[0] not in ("submitit",) and "checkpoints" not in rel.parts \
                and path.suffix not in (".safetensors", ".pt"):
            (light / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, light / rel)
finished = sum(bool(r.run.read_results().get("protocols")) for r in plan.runs)
record = {"schema": "robustcl.gpu-ladder/1", "spec": spec, "seeds": status, "ladder_s": ladder_s,
          "runs_finished": finished, "runs_planned": len(plan.runs), "overrides": overrides,
          "summary": str(light / "summary.md")}
atomic_write_text(out / "gpu_ladder.json", json.dumps(record, indent=2) + "\n")
print((light / "summary.md").read_text())
print(f"{finished} of {len(plan.runs)} runs finished; ladder {ladder_s} s; summary: {light / 'summary.md'}")
EOF
