"""``lblctl align`` throughput (images/s, CPU, 1 and 2 workers) and detection rate on the shipped faces.

Runs the real stage (``lblctl.stages.align.align``: decode, detect, norm_crop, PNG write, report) on LFW-a
photos listed in a CSV (no copying), for SCRFD and YuNet, then the detection rate (share of
readable photos that were aligned) on LFW (a sample or all 9,959), ORL and Yale B.

    /work/venv/bin/python bench/align_bench.py --quick           # seconds
    /work/venv/bin/python bench/align_bench.py                   # ~10 minutes on 2 cores (all of LFW)
    /work/venv/bin/python bench/align_bench.py --rate-sample 2000   # a 2,000-photo LFW sample
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from lblctl.core import ui  # noqa: E402
from lblctl.stages.align import AlignConfig, align  # noqa: E402

SHARED = Path(os.environ.get("LBLCTL_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"
MODELS = {"scrfd": SHARED / "models" / "scrfd_500m.onnx", "yunet": SHARED / "models" / "yunet.onnx"}


def photo_list(name: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(identity, absolute path) of ``count`` random photos of a shipped set (0 = all), sorted."""
    root = DATA / name
    items = [(ident, str(root / ident / f)) for ident in sorted(os.listdir(root)) if (root / ident).is_dir()
             for f in sorted(os.listdir(root / ident)) if not f.startswith(".")]
    if 0 < count < len(items):
        items = random.Random(seed).sample(items, count)
    return sorted(items)


def write_csv(path: Path, items: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["identity", "image"])
        w.writerows(items)
    return path


def run(items: list[tuple[str, str]], tmp: Path, tag: str, **kw: Any) -> dict[str, Any]:
    data = write_csv(tmp / f"{tag}.csv", items)
    summary = align(AlignConfig(data=data, out=tmp / tag, **kw))
    return {k: summary[k] for k in ("images", "aligned", "quarantined", "failed", "found_rate",
                                    "quarantined_by_reason", "workers", "threads_per_worker")} | {
        "images_per_s": summary["this_run"]["images_per_s"], "seconds": summary["this_run"]["seconds"],
        "startup_s": summary["this_run"]["startup_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--speed-sample", type=int, default=400, help="LFW photos per throughput run")
    ap.add_argument("--rate-sample", type=int, default=0, help="LFW photos for the detection rate (0 = all 9,959)")
    ap.add_argument("--workers", default="1,2", help="worker counts to time")
    ap.add_argument("--det-640-sample", type=int, default=300,
                    help="LFW photos for SCRFD at insightface's fixed 640×640 input (0 = skip)")
    args = ap.parse_args()
    if args.quick:
        args.speed_sample, args.rate_sample, args.det_640_sample = 40, 60, 20
    ui.set_quiet(True)
    worker_counts = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()[0]
    speed: list[dict[str, Any]] = []
    rates: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="align_bench_") as td:
        tmp = Path(td)
        sample = photo_list("lfw", args.speed_sample)
        for det in ("scrfd", "yunet"):
            for w in worker_counts:
                res = run(sample, tmp, f"speed_{det}_{w}", detector=det, model=MODELS[det], workers=w)
                speed.append({"detector": det, "det_size": "native", **res})
                print(f"{det:6s} workers={w} threads={res['threads_per_worker']}: {res['images_per_s']:.1f} img/s "
                      f"({res['images']} LFW photos, found {res['found_rate']:.4f})", flush=True)
        if args.det_640_sample:
            small = photo_list("lfw", args.det_640_sample, seed=1)
            w = max(worker_counts)
            res = run(small, tmp, "speed_scrfd640", detector="scrfd", model=MODELS["scrfd"], workers=w,
                      det_size=640)
            speed.append({"detector": "scrfd", "det_size": 640, **res})
            print(f"scrfd@640 workers={w}: {res['images_per_s']:.1f} img/s, found {res['found_rate']:.4f}",
                  flush=True)
        w = max(worker_counts)
        for det in ("scrfd", "yunet"):
            for name, count in (("lfw", args.rate_sample), ("orl", 0), ("yaleb", 0)):
                if args.quick and name != "lfw":
                    continue
                res = run(photo_list(name, count, seed=2), tmp, f"rate_{det}_{name}", detector=det,
                          model=MODELS[det], workers=w)
                rates.append({"data": name, "detector": det, **res})
                print(f"rate {det:6s} {name:5s}: {res['aligned']}/{res['images']} = {res['found_rate']:.4f} "
                      f"{res['quarantined_by_reason'] or ''} ({res['images_per_s']:.1f} img/s)", flush=True)

    md = ["Throughput of the whole stage (decode, detect, norm_crop, PNG write, report), CPU only; "
          "images/s leaves out the one-off start of the worker pool and detectors (startup_s in the JSON). "
          f"Load average at start: {load:.1f} (the box is shared).", "",
          "| detector | det size | workers × threads | photos | images/s | found |",
          "|---|---|---|---|---|---|"]
    for s in speed:
        md.append(f"| {s['detector']} | {s['det_size']} | {s['workers']} × {s['threads_per_worker']} | "
                  f"{s['images']} | {s['images_per_s']:.1f} | {s['found_rate']:.4f} |")
    md += ["", "Detection rate (aligned / readable photos; SCRFD score ≥ 0.5, YuNet ≥ 0.6, box ≥ 24 px):", "",
           "| data | detector | photos | aligned | rate | quarantined by reason | images/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rates:
        md.append(f"| {r['data']} | {r['detector']} | {r['images']} | {r['aligned']} | {r['found_rate']:.4f} | "
                  f"{r['quarantined_by_reason'] or '-'} | {r['images_per_s']:.1f} |")
    path = write_results("align_bench", {"args": vars(args), "load_average": load, "speed": speed,
                                         "detection_rate": rates}, "\n".join(md))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
