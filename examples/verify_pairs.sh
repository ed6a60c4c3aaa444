#!/usr/bin/env bash
# Batch ID/spot verification: score every pair of a CSV with a backbone, deciding same/different at
# the threshold that gave a chosen false-accept rate in an eval report of the same backbone.
#
#   bash examples/verify_pairs.sh [PAIRS.csv] [BACKBONE] [REPORT/metrics.json] [FAR] [OUT.csv]
#
# Defaults: the shipped pairs_sample.csv (raw photos, aligned on the fly with the shipped YuNet),
# the backbone and report of examples/quickstart.sh, FAR 1e-1, scores written beside the pairs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
qs="${LBLCTL_QUICKSTART_OUT:-$here/../quickstart_out}"
pairs="${1:-$here/pairs_sample.csv}"
backbone="${2:-$qs/run2/backbone.pt}"
report="${3:-$qs/report_after/metrics.json}"
far="${4:-1e-1}"
out="${5:-${pairs%.csv}_scores.csv}"
if command -v lblctl >/dev/null 2>&1; then L=(lblctl); else L=(python3 -m lblctl.cli); fi
[ -f "$backbone" ] || { echo "error: $backbone not found; run bash examples/quickstart.sh first or pass a backbone" >&2; exit 2; }
"${L[@]}" verify-pair --backbone "$backbone" --pairs "$pairs" --out "$out" --far "$far" --calibration "$report" \
  --align yunet --align-model "$here/models/yunet.onnx" --device "${LBLCTL_DEVICE:-auto}" --json --overwrite
echo "scores: $out (every input column + score, same_pred, error)" >&2
