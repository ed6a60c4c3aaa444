"""verify-pair throughput on CPU: pairs/s with and without the embedding cache, against the forward limit.

Cases (all with the same small_cnn backbone, real LFW photos):

* forward     the backbone alone on ready tensors (images/s); a pair of two new images can go no
              faster than half of that: the *forward limit* in pairs/s;
* decode      the DataLoader alone (JPEG decode + preprocessing), images/s;
* unique      verify-pair on pairs whose images all differ (every image embedded once);
* cached      verify-pair on pairs drawn from the same images, each image in ~R pairs;
* no cache    the same pairs with --cache-size 0 (every occurrence embedded again);
* stream      a long CSV over few images (all cached): the per-row cost of reading, scoring and
              writing, and the memory it holds (flat: rows go through in chunks).

    /work/venv/bin/python bench/verify_bench.py --quick
    /work/venv/bin/python bench/verify_bench.py --images 2000 --repeat 10
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import anon_rss_mib, peak_rss_mib, write_results  # noqa: E402

from lblctl.core import ui  # noqa: E402
from lblctl.data.faces import PathDataset, Preprocess, make_loader  # noqa: E402
from lblctl.models.backbones import create_backbone  # noqa: E402
from lblctl.models.checkpoint import load_backbone, save_backbone  # noqa: E402
from lblctl.stages.verify import verify_pairs  # noqa: E402

LFW = Path(os.environ.get("LBLCTL_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "lfw"


def lfw_images(n: int) -> list[str]:
    out: list[str] = []
    for name in sorted(os.listdir(LFW)):
        for f in sorted(os.listdir(LFW / name)):
            out.append(str(LFW / name / f))
            if len(out) == n:
                return out
    return out


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id_image", "spot_image"])
        w.writerows(pairs)
    return path


def forward_rate(bb, batch_size: int, seconds: float) -> float:
    x = torch.rand(batch_size, 3, bb.preprocess.input_size, bb.preprocess.input_size) * 2 - 1
    bb.embed(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        bb.embed(x)
        n += batch_size
    return n / (time.perf_counter() - t0)


def decode_rate(paths: list[str], pre: Preprocess, batch_size: int, workers: int) -> float:
    t0 = time.perf_counter()
    n = sum(len(b) for b in make_loader(PathDataset(paths, pre), batch_size=batch_size, workers=workers))
    return n / (time.perf_counter() - t0)


def run_verify(bb, pairs_csv: Path, out: Path, **kw) -> dict:
    t0 = time.perf_counter()
    s = verify_pairs(bb, pairs_csv, out, threshold=0.5, **kw)
    s["wall_s"] = time.perf_counter() - t0
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="seconds: 200 images, repeat 4")
    ap.add_argument("--images", type=int, default=1200, help="distinct images")
    ap.add_argument("--repeat", type=int, default=8, help="pairs per image in the cached case")
    ap.add_argument("--stream-rows", type=int, default=300_000, help="rows of the long CSV (stream case)")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=32, help="small_cnn width")
    ap.add_argument("--embedding-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeat, args.stream_rows = 200, 4, 30_000
    if args.threads:
        torch.set_num_threads(args.threads)
    ui.set_quiet(True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = create_backbone("small_cnn", args.embedding_size, args.input_size, width=args.width)
        pre = Preprocess(args.input_size, 0.6)
        save_backbone(tmp / "bb.pt", model, arch="small_cnn", embedding_size=args.embedding_size, preprocess=pre,
                      arch_kwargs={"width": args.width})
        bb = load_backbone(tmp / "bb.pt")
        images = lfw_images(args.images)
        n = len(images) - len(images) % 2
        fwd = forward_rate(bb, args.batch_size, 2.0 if args.quick else 5.0)
        dec = decode_rate(images[:n], pre, args.batch_size, args.workers)
        limit = fwd / 2
        common = {"batch_size": args.batch_size, "workers": args.workers}
        unique_csv = write_pairs(tmp / "unique.csv", list(zip(images[0:n:2], images[1:n:2], strict=True)))
        unique = run_verify(bb, unique_csv, tmp / "u.csv", cache_size=50_000, **common)
        m = n * args.repeat // 2
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        rep_csv = write_pairs(tmp / "rep.csv", [(images[i], images[j]) for i, j in zip(a, b, strict=True)])
        cached = run_verify(bb, rep_csv, tmp / "c.csv", cache_size=50_000, **common)
        nocache = run_verify(bb, rep_csv, tmp / "n.csv", cache_size=0, **common)
        few = images[:64]
        a, b = rng.integers(0, len(few), args.stream_rows), rng.integers(0, len(few), args.stream_rows)
        long_csv = write_pairs(tmp / "long.csv", [(few[i], few[j]) for i, j in zip(a, b, strict=True)])
        rss_before = anon_rss_mib()
        stream = run_verify(bb, long_csv, tmp / "l.csv", cache_size=50_000, chunk_rows=8192, **common)
        rss_after = anon_rss_mib()
    rows = {
        "forward": {"images_per_s": fwd, "pairs_per_s_limit": limit},
        "decode": {"images_per_s": dec},
        "unique": {"pairs": unique["rows"], "pairs_per_s": unique["rows"] / unique["wall_s"],
                   "embedded": unique["embedded"], "vs_forward_limit": unique["rows"] / unique["wall_s"] / limit},
        "cached": {"pairs": cached["rows"], "pairs_per_s": cached["rows"] / cached["wall_s"],
                   "embedded": cached["embedded"], "vs_forward_limit": cached["rows"] / cached["wall_s"] / limit},
        "no_cache": {"pairs": nocache["rows"], "pairs_per_s": nocache["rows"] / nocache["wall_s"],
                     "embedded": nocache["embedded"],
                     "vs_forward_limit": nocache["rows"] / nocache["wall_s"] / limit},
    }
    rows["stream"] = {"pairs": stream["rows"], "pairs_per_s": stream["rows"] / stream["wall_s"],
                      "embedded": stream["embedded"], "anon_rss_mib_before": rss_before,
                      "anon_rss_mib_after": rss_after}
    params = vars(args) | {"distinct_images": n}
    md = [f"small_cnn width {args.width}, {args.input_size} px, embedding {args.embedding_size}; "
          f"{n} distinct LFW images; batch {args.batch_size}; {args.workers} loader worker(s); "
          f"torch threads {torch.get_num_threads()}.", "",
          "| case | pairs | images embedded | pairs/s | × forward limit |", "|---|---|---|---|---|",
          f"| forward (ready tensors) | – | – | {limit:.0f} (= {fwd:.0f} img/s ÷ 2) | 1.00 |",
          f"| decode only (loader) | – | – | {dec / 2:.0f} (= {dec:.0f} img/s ÷ 2) | {dec / 2 / limit:.2f} |"]
    for key in ("unique", "cached", "no_cache"):
        r = rows[key]
        md.append(f"| {key.replace('_', ' ')} | {r['pairs']} | {r['embedded']} | {r['pairs_per_s']:.0f} | "
                  f"{r['vs_forward_limit']:.2f} |")
    st = rows["stream"]
    md.append(f"| stream (64 images, all cached) | {st['pairs']} | {st['embedded']} | {st['pairs_per_s']:.0f} | – |")
    md.append(f"\nStream case: anonymous RSS {st['anon_rss_mib_before']:.0f} MiB before, "
              f"{st['anon_rss_mib_after']:.0f} MiB after {st['pairs']} rows (chunks of 8192 rows). "
              f"Peak RSS {peak_rss_mib():.0f} MiB.")
    path = write_results("verify_bench", {"params": params, "results": rows, "peak_rss_mib": peak_rss_mib()},
                         "\n".join(md))
    print("\n".join(md))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
