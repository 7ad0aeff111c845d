#!/usr/bin/env bash
# Issue 21 point 7: the same short runs before and after the redesign; usage: PY=python run_proof.sh OUTDIR
set -euo pipefail
OUT=$1; PY=${PY:-python}; mkdir -p "$OUT"
SHORT="train.max_steps=6 train.checkpoint_every=3 train.log_every=3 diagnostics.every=3 finetune.epochs=1 finetune.val_limit=64 finetune.alf_train_limit=128 eval.limit=64"
$PY -m robustcl run --config smoke --out "$OUT/smoke" --quiet
$PY -m robustcl run --config fmnist-gbrcl --out "$OUT/gbrcl" --quiet $SHORT
$PY -m robustcl run --config fmnist-dynacl++ --out "$OUT/dynaclpp" --quiet $SHORT finetune.postprocess.lp_epochs=1 finetune.postprocess.aff.epochs=1 finetune.postprocess.aff.train_limit=256
$PY -m robustcl run --config fmnist-deacl --out "$OUT/deacl" --quiet $SHORT "method.teacher_overrides=[train.max_steps=6,train.checkpoint_every=3]"
cat > "$OUT/tiny.yaml" <<'YAML'
name: proof-tiny
seeds: [0]
grid:
  base: smoke
  axes:
    method.critic.weight: [0.0, 0.1]
YAML
$PY -m robustcl sweep --spec "$OUT/tiny.yaml" --out "$OUT/sweep" --quiet
