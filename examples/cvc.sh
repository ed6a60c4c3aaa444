#!/usr/bin/env bash
# The paper's CVC recipe on LFW, on CPU in minutes, beside the single-stage chain:
#   C  pretrain a small CNN with a margin softmax on a general set (LFW identities that are NOT ID/spot ones)
#   V  pretrain --init C with a verification loss (contrastive, batch-hard) on the ID/spot identities:
#      P identities × (ID photo + 1 spot photo) per batch, hardest positive and negative mined in the batch
#   C  imprint the ID photos with the V model, build-index, train-dp (DP-softmax over all ID/spot identities)
# and, for comparison, C → imprint → train-dp without V. `eval` after each stage on held-out spot photos
# of the ID/spot identities (closed-set top-1 against the store) and on all pairs of identities that no
# stage trained on (TAR@FAR, AUC). Table: $work/results.md and results.json.
#
#   bash examples/cvc.sh                       # needs ../shared/data/lfw beside the clone (LBLCTL_SHARED to move it)
#   CVC_IDS=300 CVC_EPOCHS_C=4 bash examples/cvc.sh   # larger (sizes below); LBLCTL_CVC_OUT=DIR for the output
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
work="${LBLCTL_CVC_OUT:-$repo/cvc_out}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
# CVC_KEEP_C=1 keeps an earlier run's C model (the longest stage) when its sizes were the same
keep_c="${CVC_KEEP_C:-0}"
[ "$keep_c" = 1 ] && [ -f "$work/c/backbone.pt" ] || keep_c=0
for sub in split c c_store c_report v v_store v_report cvc cvc_store cvc_report cc cc_store cc_report; do
  if [ "$sub" = c ] && [ "$keep_c" = 1 ]; then continue; fi
  rm -rf "${work:?}/$sub" "${work:?}/$sub.json"
done
if command -v lblctl >/dev/null 2>&1; then L=(lblctl); else L=(python3 -m lblctl.cli); fi
if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
# Figures depend on torch's intra-op thread count (float sums) and the worker count: both fixed (README).
export OMP_NUM_THREADS="${LBLCTL_THREADS:-2}" MKL_NUM_THREADS="${LBLCTL_THREADS:-2}"
dev=(--device "${LBLCTL_DEVICE:-auto}" --seed 0)
common=("${dev[@]}" --workers 1)
# sizes (small enough for a 2-core CPU; raise them on a real machine)
ids="${CVC_IDS:-150}"             # ID/spot identities (ID photo + 1–2 training spot photos, up to 4 held out)
verify="${CVC_VERIFY:-60}"        # identities nobody trains on: the open-set pairs
epochs_c="${CVC_EPOCHS_C:-3}"     # C: epochs on the general set
min_c="${CVC_MIN_C:-4}"           # C: general identities with at least this many photos …
max_c="${CVC_MAX_C:-15}"          # … and at most this many of each (LFW is long-tailed)
epochs_v="${CVC_EPOCHS_V:-10}"    # V: epochs on the ID/spot identities (16 identities × 2 photos a step)
steps_dp="${CVC_STEPS_DP:-60}"    # C (train-dp): steps of 32 identities × 2 photos
size=(--input-size 48 --center-crop 0.6)
width="${CVC_WIDTH:-16}"          # small_cnn base width
stage() { echo; echo "== $1" >&2; }

stage "0 split LFW (bench/accuracy_bench.py's fixed split): general set, ID/spot identities, open-set group"
$PY - "$repo" "$work/split" "$ids" "$verify" "$min_c" "$max_c" <<'PY'
import csv, itertools, os, sys
from pathlib import Path
repo, root, n_ids, n_verify = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
min_c, max_c = int(sys.argv[5]), int(sys.argv[6])
sys.path.insert(0, str(repo / "bench"))
from accuracy_bench import lfw_split, write_folder  # the one LFW split of the benchmarks (seed 0)

split = lfw_split(root, n_ids=n_ids, n_distractors=0, n_verify=n_verify)   # root/pretrain = the general set
write_folder(root / "ids", split["train"])      # ID photo (id_…) + 1–2 training spot photos per identity
general = 0
with open(root / "general.csv", "w", newline="") as f:  # C's set: min_c–max_c photos of each general identity
    w = csv.writer(f); w.writerow(["identity", "image"])
    for n in split["pretrain"]:
        files = sorted(os.listdir(root / "pretrain" / n))
        if len(files) >= min_c:
            general += 1
            w.writerows([n, f"pretrain/{n}/{x}"] for x in files[:max_c])
with open(root / "probes.csv", "w", newline="") as f:   # held-out spot photos of the same identities
    w = csv.writer(f); w.writerow(["identity", "image"]); w.writerows(split["probes"])
photos = [(n, p) for n in sorted(split["verify"]) for p in split["verify"][n]]
with open(root / "open_pairs.csv", "w", newline="") as f:  # every pair of the open-set group's photos
    w = csv.writer(f); w.writerow(["id_image", "spot_image", "same"])
    for (a, pa), (b, pb) in itertools.combinations(photos, 2):
        w.writerow([pa, pb, int(a == b)])
print(f"general set: {general} identities; ID/spot: {len(split['train'])} identities, "
      f"{len(split['probes'])} held-out spot photos; open set: {len(split['verify'])} identities, "
      f"{len(photos)} photos", file=sys.stderr)
PY
s="$work/split"

evaluate() {  # evaluate BACKBONE STORE REPORT
  "${L[@]}" eval --backbone "$1" --store "$2" --probes "$s/probes.csv" --pairs "$s/open_pairs.csv" \
    --out "$3" "${common[@]}" --json > "$3.json"
}
imprint() {  # imprint BACKBONE STORE: ID photos → prototypes, then the queues
  "${L[@]}" imprint --data "$s/ids" --backbone "$1" --out "$2" --photos id "${common[@]}" --json > "$2.json"
  "${L[@]}" build-index --store "$2" --candidates 16 --dominant 8 "${dev[@]}" --json > "$2.index.json"
}
train_dp() {  # train_dp BACKBONE STORE RUN OUT_STORE
  "${L[@]}" train-dp --data "$s/ids" --backbone "$1" --store "$2" --out "$3" --out-store "$4" \
    --classes 32 --sampled 8 --steps "$steps_dp" --lr 0.01 --checkpoint-every 0 "${common[@]}" --json > "$3.json"
}

stage "1 C: pretrain small_cnn (cosface) on the general set"
[ "$keep_c" = 1 ] && echo "(CVC_KEEP_C=1: keeping $work/c)" >&2 || "${L[@]}" pretrain --data "$s/general.csv" --out "$work/c" --arch small_cnn --width "$width" "${size[@]}" \
  --embedding-size 128 --batch-size 64 --epochs "$epochs_c" --lr 0.1 --warmup-steps 10 --val-fraction 0.05 \
  "${common[@]}" --json > "$work/c.json"
imprint "$work/c" "$work/c_store"
evaluate "$work/c" "$work/c_store" "$work/c_report"

stage "2 V: pretrain --init C, contrastive loss, batch-hard mining, P identities × (ID + spot photo)"
"${L[@]}" pretrain --data "$s/ids" --out "$work/v" --init "$work/c" --loss contrastive --mining batchhard \
  --pk-identities 16 --pk-images 2 --pk-id-spot --epochs "$epochs_v" --lr 0.05 --val-fraction 0 \
  "${common[@]}" --json > "$work/v.json"
imprint "$work/v" "$work/v_store"
evaluate "$work/v" "$work/v_store" "$work/v_report"

stage "3 C: train-dp from the V model over all ID/spot identities (C → V → C)"
train_dp "$work/v" "$work/v_store" "$work/cvc" "$work/cvc_store"
evaluate "$work/cvc" "$work/cvc_store" "$work/cvc_report"

stage "4 single stage for comparison: train-dp straight from C (C → C)"
train_dp "$work/c" "$work/c_store" "$work/cc" "$work/cc_store"
evaluate "$work/cc" "$work/cc_store" "$work/cc_report"

stage "results"
$PY - "$work" "$ids" "$verify" "$epochs_c" "$epochs_v" "$steps_dp" <<'PY'
import json, os, platform, sys
from pathlib import Path
w = Path(sys.argv[1])
j = lambda n: json.loads((w / n).read_text())
rows = [("C (pretrain on the general set, imprint)", "c"), ("C → V (+ verification fine-tuning, re-imprint)", "v"),
        ("C → V → C (+ train-dp): the CVC recipe", "cvc"), ("C → C (train-dp from C, no V): single stage", "cc")]
def figures(tag):
    m = j(f"{tag}_report/metrics.json")
    ident, ver = m["identification"], m["verification"]
    tar = {str(t["far"]): t.get("tar") for t in ver.get("tar_at_far", [])} if isinstance(ver.get("tar_at_far"), list) \
        else {k: (v.get("tar") if isinstance(v, dict) else v) for k, v in (ver.get("tar_at_far") or {}).items()}
    return {"top1": ident["top1"], "top5": ident["top5"], "probes": ident.get("probes"),
            "auc": ver["auc"], "eer": ver.get("eer"), "tar_at_far": tar,
            "pairs": {"genuine": ver.get("genuine"), "impostor": ver.get("impostor")}}
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except (OSError, StopIteration):
    cpu = platform.processor() or platform.machine()
res = {"sizes": {"id_spot_identities": int(sys.argv[2]), "open_set_identities": int(sys.argv[3]),
                 "epochs_c": int(sys.argv[4]), "epochs_v": int(sys.argv[5]), "train_dp_steps": int(sys.argv[6])},
       "machine": f"{cpu}, {os.cpu_count()} cores, {os.environ.get('OMP_NUM_THREADS')} torch threads",
       "loadavg": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
       "c": {k: j("c.json").get(k) for k in ("steps", "final_loss", "val_accuracy", "train_identities")},
       "v": {k: j("v.json").get(k) for k in ("steps", "final_loss", "loss", "loss_options", "batches")},
       "rows": {tag: {"label": label, **figures(tag)} for label, tag in rows}}
(w / "results.json").write_text(json.dumps(res, indent=1))
def tar(f, far):
    for k, v in f["tar_at_far"].items():
        if float(k) == far:
            return "–" if v is None else f"{v:.3f}"
    return "–"
md = ["| stages | top-1 | top-5 | TAR@FAR 1e-2 | TAR@FAR 1e-3 | AUC | EER |", "|---|---|---|---|---|---|---|"]
for tag, f in res["rows"].items():
    md.append(f"| {f['label']} | {f['top1']:.3f} | {f['top5']:.3f} | {tar(f, 1e-2)} | {tar(f, 1e-3)} | "
              f"{f['auc']:.3f} | {f['eer']:.3f} |")
md += ["", f"top-1/top-5: held-out spot photos of the {sys.argv[2]} ID/spot identities against their prototypes; "
       f"TAR/AUC/EER: every pair of photos of {sys.argv[3]} LFW identities no stage trained on "
       f"({res['rows']['c']['pairs']['genuine']} genuine, {res['rows']['c']['pairs']['impostor']} impostor). "
       f"Machine: {res['machine']}; load average {' '.join(res['loadavg'] or [])} at the end."]
(w / "results.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY
echo "(table: $work/results.md, figures: $work/results.json, reports: $work/*_report/)" >&2
