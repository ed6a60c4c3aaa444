"""insightface ``.rec`` reading vs identity folders on the same images, and the converted ONNX backbone's speed.

1. Packs LFW-a (9,959 JPEGs, 250×250, or ``--images N`` of them) with ``lblctl pack`` into a temp folder,
   then reads every image through the training path (``FaceDataset`` → ``make_loader``: decode,
   resize to 112, normalise) from the folders and from the ``.rec``, with 1 and 2 DataLoader workers,
   in alternating order (page cache warm for both after the first pass). Reports images/s.
2. ``--onnx``: forward+backward time on CPU of an iresnet18 exported to ONNX and converted back with
   onnx2torch vs our own iresnet18 (same weights), batch 16 at 112 px.

    nice -n 10 python bench/rec_bench.py --images 3000 --onnx    # a few minutes on 2 busy cores
    nice -n 10 python bench/rec_bench.py                          # all of LFW
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import anon_rss_mib, write_results  # noqa: E402

from lblctl.core import ui  # noqa: E402
from lblctl.data.faces import FaceDataset, Preprocess, make_loader, open_face_set  # noqa: E402
from lblctl.stages.pack import PackConfig, run  # noqa: E402

SHARED = Path(os.environ.get("LBLCTL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
LFW = SHARED / "data" / "lfw"


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()


def read_all(data: Path, workers: int, batch: int = 64) -> tuple[float, int]:
    index = open_face_set(data)
    ds = FaceDataset(index, np.arange(index.num_images), None, Preprocess(112))
    t0 = time.perf_counter()
    n = 0
    for b in make_loader(ds, batch_size=batch, workers=workers):
        n += len(b)
    return n / (time.perf_counter() - t0), n


def onnx_speed(tmp: Path, reps: int = 5) -> dict[str, Any]:
    from lblctl.data.faces import Preprocess as P
    from lblctl.models.backbones import create_backbone
    from lblctl.models.checkpoint import load_backbone, save_backbone
    from lblctl.models.export import export_onnx

    torch.manual_seed(0)
    ours = create_backbone("iresnet18", 512, 112)
    save_backbone(tmp / "ir" / "backbone.pt", ours, arch="iresnet18", embedding_size=512, preprocess=P(112, 1.0))
    export_onnx(tmp / "ir", tmp / "ir.onnx")
    converted = load_backbone(tmp / "ir.onnx").model
    x = torch.rand(16, 3, 112, 112) * 2 - 1
    out: dict[str, Any] = {}
    for name, m in (("iresnet18 (ours)", ours), ("iresnet18 via ONNX + onnx2torch", converted)):
        m.train()
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            m(x).pow(2).sum().backward()
            m.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        out[name] = {"fwd_bwd_s_batch16": float(np.median(times)), "reps": reps}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=0, help="only the first N LFW images (0 = all)")
    ap.add_argument("--onnx", action="store_true", help="also time the converted ONNX backbone")
    ap.add_argument("--name", default="rec_bench")
    args = ap.parse_args()
    ui.set_quiet(True)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"loadavg_start": loadavg(), "threads_per_process": 1}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        data: Path = LFW
        if args.images:
            index = open_face_set(LFW)
            rows = np.arange(min(args.images, index.num_images))
            data = tmp / "subset.csv"
            with open(data, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["identity", "image"])
                ident = index.image_identity
                for r in rows:
                    w.writerow([index.names[int(ident[r])], index.path(int(r))])
        t0 = time.perf_counter()
        summary = run(PackConfig(data=data, out=tmp / "rec"))
        pack_s = time.perf_counter() - t0
        results["pack"] = {"images": summary["images"], "identities": summary["identities"], "seconds": pack_s,
                           "images_per_s": summary["images"] / pack_s, "rec_bytes": summary["rec_bytes"]}
        rss0 = anon_rss_mib()
        open_face_set(tmp / "rec")
        results["rec_index_anon_rss_growth_mib"] = anon_rss_mib() - rss0
        rows_out = []
        for workers in (1, 2):
            for source, path in (("folders", data), ("rec", tmp / "rec"), ("folders", data), ("rec", tmp / "rec")):
                ips, n = read_all(path, workers)
                rows_out.append({"source": source, "workers": workers, "images": n, "images_per_s": ips})
        results["read"] = rows_out
        if args.onnx:
            results["onnx_cpu"] = onnx_speed(tmp)
    results["loadavg_end"] = loadavg()
    best = {}
    for r in rows_out:
        key = (r["source"], r["workers"])
        best[key] = max(best.get(key, 0.0), r["images_per_s"])
    pk = results["pack"]
    md = [f"Pack: {pk['images']} images in {pk['seconds']:.1f} s ({pk['images_per_s']:.0f} images/s), "
          f"train.rec {pk['rec_bytes'] / 2**20:.1f} MiB.",
          "", "| source | workers | images/s (best of 2 passes) |", "|---|---|---|"]
    md += [f"| {s} | {w} | {v:.0f} |" for (s, w), v in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    if args.onnx:
        md += ["", "| model (CPU, 1 thread) | fwd+bwd s, batch 16 |", "|---|---|"]
        md += [f"| {k} | {v['fwd_bwd_s_batch16']:.3f} |" for k, v in results["onnx_cpu"].items()]
    md += ["", f"Load average at start {results['loadavg_start']}, at end {results['loadavg_end']} "
           "(the machine is shared; figures are relative).",
           f"Command: `nice -n 10 python bench/rec_bench.py{' --images ' + str(args.images) if args.images else ''}"
           f"{' --onnx' if args.onnx else ''}`"]
    path = write_results(args.name, results, "\n".join(md))
    print("\n".join(md))
    print(path)


if __name__ == "__main__":
    main()
