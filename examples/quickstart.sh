#!/usr/bin/env bash
# lblctl quickstart: from the shipped real faces to a trained backbone, on CPU in a few minutes.
# Each stage reads the previous stage's artifacts by path; the script stops at the first error.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="$here/data/faces"
work="${LBLCTL_QUICKSTART_OUT:-$here/../quickstart_out}"
mkdir -p "$work"
rm -rf "$work/run"  # a fresh demo run each time (pass --resume by hand to continue one)
if command -v lblctl >/dev/null 2>&1; then L=(lblctl); else L=(python3 -m lblctl.cli); fi
common=(--device "${LBLCTL_DEVICE:-auto}" --seed 0)

stage() { echo; echo "== $1"; }

stage "pretrain a small CNN on the demo faces (100 identities, 48 px)"
"${L[@]}" pretrain --data "$data" --out "$work/run" --arch small_cnn --input-size 48 --center-crop 0.6 \
  --embedding-size 128 --batch-size 64 --epochs 8 --lr 0.1 --warmup-steps 5 --val-fraction 0.2 \
  "${common[@]}" --json > "$work/pretrain.json"

echo
echo "== artifacts"
echo "backbone:  $work/run/backbone.pt"
echo "manifest:  $work/run/manifest.json"
echo "log:       $work/run/log.jsonl"
python3 - "$work/pretrain.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"pretrain: {s['steps']} steps, final loss {s['final_loss']:.3f}, "
      f"held-out verification accuracy {s['val_accuracy']:.3f} on {s['val_pairs']} pairs")
PY
