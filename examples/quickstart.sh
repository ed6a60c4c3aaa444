#!/usr/bin/env bash
# lblctl quickstart: raw photos → aligned crops → backbone → prototype store → queues → DP-softmax
# → figures before and after → batch verification, on the shipped real faces, on CPU in minutes.
# Each stage reads the previous stage's artifacts by path; the script stops at the first error.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
raw="$here/data/faces"
work="${LBLCTL_QUICKSTART_OUT:-$here/../quickstart_out}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
for sub in aligned run store run2 report_before report_after scores.csv; do rm -rf "${work:?}/$sub"; done
if command -v lblctl >/dev/null 2>&1; then L=(lblctl); else L=(python3 -m lblctl.cli); fi
if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
common=(--device "${LBLCTL_DEVICE:-auto}" --seed 0)
# The same figures on every machine of one CPU kind: torch's float sums (and so the trained weights)
# depend on its intra-op thread count, which defaults to the number of cores, and the DataLoader
# worker count defaults to cores − 1. Both are fixed here (LBLCTL_THREADS to change the first).
export OMP_NUM_THREADS="${LBLCTL_THREADS:-2}" MKL_NUM_THREADS="${LBLCTL_THREADS:-2}"
workers=(--workers 1)
stage() { echo; echo "== $1" >&2; }

stage "1/8 align: detect (YuNet) and crop every photo to the ArcFace template, 112×112"
"${L[@]}" align --data "$raw" --out "$work/aligned" --detector yunet --model "$here/models/yunet.onnx" \
  "${common[@]}" "${workers[@]}" --json > "$work/align.json"

stage "2/8 split: 60 identities pretrain the backbone; the other 40 are the ID-vs-spot set"
$PY - "$work/aligned" <<'PY'
import csv, os, sys
root = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(root, "faces.csv"))))
names = sorted({r["identity"] for r in rows})
pre, dp = set(names[:60]), names[60:]
by = {}
for r in rows:
    by.setdefault(r["identity"], []).append(r)
with open(os.path.join(root, "pretrain.csv"), "w", newline="") as f:
    w = csv.writer(f); w.writerow(["identity", "image", "kind"])
    for r in rows:
        if r["identity"] in pre:
            w.writerow([r["identity"], r["image"], r["kind"]])
with open(os.path.join(root, "dp.csv"), "w", newline="") as f, \
     open(os.path.join(root, "probes.csv"), "w", newline="") as p, \
     open(os.path.join(root, "pairs.csv"), "w", newline="") as q:
    w, pw, qw = csv.writer(f), csv.writer(p), csv.writer(q)
    w.writerow(["identity", "image", "kind"]); pw.writerow(["identity", "image"])
    qw.writerow(["id_image", "spot_image", "same"])
    ids = {}
    for n in dp:
        photos = sorted(by[n], key=lambda r: (r["kind"] != "id", r["image"]))
        if len(photos) < 3:
            continue
        for r in photos[:-1]:  # ID photo + spot photos train; the last spot photo is held out
            w.writerow([n, r["image"], r["kind"]])
        pw.writerow([n, photos[-1]["image"]])
        ids[n] = (photos[0]["image"], photos[-1]["image"])
    keys = sorted(ids)
    for i, n in enumerate(keys):  # every held-out spot photo against its own ID photo and another's
        qw.writerow([ids[n][0], ids[n][1], 1])
        qw.writerow([ids[keys[(i + 7) % len(keys)]][0], ids[n][1], 0])
PY

stage "3/8 pretrain a small CNN on the 60 identities"
"${L[@]}" pretrain --data "$work/aligned/pretrain.csv" --out "$work/run" --arch small_cnn --input-size 48 \
  --embedding-size 128 --batch-size 64 --epochs 12 --lr 0.1 --warmup-steps 5 --val-fraction 0.15 \
  "${common[@]}" "${workers[@]}" --json > "$work/pretrain.json"

stage "4/8 imprint: one prototype per ID-vs-spot identity, from its ID photo"
"${L[@]}" imprint --data "$work/aligned/dp.csv" --backbone "$work/run/backbone.pt" --out "$work/store" \
  --photos id "${common[@]}" "${workers[@]}" --json > "$work/imprint.json"

stage "5/8 build-index: candidate and dominant queues (faiss)"
"${L[@]}" build-index --store "$work/store" --candidates 16 --dominant 8 "${common[@]}" --json > "$work/index.json"

stage "6/8 eval before DP training: held-out spot photos against the store, and ID/spot pairs"
"${L[@]}" eval --backbone "$work/run" --store "$work/store" --probes "$work/aligned/probes.csv" \
  --pairs "$work/aligned/pairs.csv" --out "$work/report_before" "${common[@]}" "${workers[@]}" --json > "$work/eval_before.json"

stage "7/8 train-dp: K = 16 prototypes per step, 4 sampled + 12 from dominant queues, ID + spot photos"
"${L[@]}" train-dp --data "$work/aligned/dp.csv" --backbone "$work/run/backbone.pt" --store "$work/store" \
  --out "$work/run2" --classes 16 --sampled 4 --steps 60 --lr 0.01 --head-lr 0.5 --checkpoint-every 20 \
  "${common[@]}" "${workers[@]}" --json > "$work/train_dp.json"
"${L[@]}" eval --backbone "$work/run2" --store "$work/store" --probes "$work/aligned/probes.csv" \
  --pairs "$work/aligned/pairs.csv" --out "$work/report_after" "${common[@]}" "${workers[@]}" --json > "$work/eval_after.json"

stage "8/8 verify-pair: score the ID/spot pairs at the threshold of FAR 1e-1 from the report"
"${L[@]}" verify-pair --backbone "$work/run2" --pairs "$work/aligned/pairs.csv" --out "$work/scores.csv" \
  --far 1e-1 --calibration "$work/report_after/metrics.json" "${common[@]}" "${workers[@]}" --json > "$work/verify.json"

echo
echo "== artifacts (under $work)"
for a in aligned/align_report.csv run/backbone.pt store/prototypes.h5 store/queues.h5 run2/backbone.pt \
         report_before/metrics.json report_after/metrics.json scores.csv; do
  echo "  $a"
done
$PY - "$work" <<'PY'
import json, os, sys
w = sys.argv[1]
j = lambda n: json.load(open(os.path.join(w, n)))
a, p, t = j("align.json"), j("pretrain.json"), j("train_dp.json")
b, f = json.load(open(os.path.join(w, "report_before/metrics.json"))), json.load(open(os.path.join(w, "report_after/metrics.json")))
print(f"align:     {a.get('aligned', a.get('found', '?'))} photos aligned")
print(f"pretrain:  {p['steps']} steps, held-out verification accuracy {p['val_accuracy']:.3f}")
print(f"train-dp:  {t['steps']} steps, final loss {t['final_loss']:.3f}, {t['store_rows_touched']} store rows, "
      f"{t['queue_changes']} queue updates")
print(f"{'':11}{'before':>8}{'after':>8}")
for key in ("top1", "top5"):
    print(f"{key:11}{b['identification'][key]:8.3f}{f['identification'][key]:8.3f}")
print(f"{'accuracy':11}{b['verification']['accuracy']:8.3f}{f['verification']['accuracy']:8.3f}")
print(f"{'AUC':11}{b['verification']['auc']:8.3f}{f['verification']['auc']:8.3f}")
v = j("verify.json")
print("verify-pair:", {k: v[k] for k in v if k in ("scored", "failed", "accuracy", "threshold", "tar", "far_measured")})
PY
