"""Prototype-store traffic and imprint throughput.

1. gather + scatter + commit of K random rows (D = 512) at N = 10k … 10M: time per step and
   anonymous RSS, memory-mapped and (where it fits) RAM-cached, warm page cache and, after
   ``posix_fadvise(DONTNEED)``, cold. Stores are made by a fast direct path (one random block
   reused with rolled columns, written by ``PrototypeStore.fill``) in ``--dir`` and deleted after.
2. imprint throughput vs the same backbone's pure forward on the same batches (decode hidden?).

    python bench/store_bench.py --quick
    python bench/store_bench.py --sizes 10000,100000,1000000,10000000 --dir /work/tmp
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import anon_rss_mib, peak_rss_mib, write_results  # noqa: E402

from lblctl.core.store import FILENAME, PrototypeStore  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_store(folder: Path, n: int, dim: int, dtype: str) -> float:
    """Create an N×D store quickly; return seconds."""
    t = time.perf_counter()
    block_rows = 65536
    block = np.random.default_rng(0).standard_normal((block_rows, dim), dtype=np.float32)
    names = (f"id{i:08d}" for i in range(n))
    with PrototypeStore.create(folder, dim, names, dtype=dtype, cache="mmap") as s:
        for k, a in enumerate(range(0, n, block_rows)):
            b = min(n, a + block_rows)
            s.fill(a, np.roll(block[: b - a], k % dim, axis=1))
    return time.perf_counter() - t


def drop_file_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def prefault(path: Path) -> None:
    """Read the file once so that its pages sit in the page cache (a warm, long-running trainer)."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(16 << 20):
            pass


def run_steps(store: PrototypeStore, n: int, k: int, steps: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    rows_all = [rng.choice(n, k, replace=False) for _ in range(steps)]
    noise = rng.standard_normal((k, store.embedding_size), dtype=np.float32) * 0.01
    tg, ts, tc = [], [], []
    for i, rows in enumerate(rows_all):
        t0 = time.perf_counter()
        v = store.gather(rows)
        t1 = time.perf_counter()
        store.scatter(rows, v + noise)
        t2 = time.perf_counter()
        store.commit(store.committed_step + 1 if store.committed_step >= 0 else i)
        t3 = time.perf_counter()
        tg.append(t1 - t0)
        ts.append(t2 - t1)
        tc.append(t3 - t2)
    med = lambda x: float(np.median(x) * 1e3)  # noqa: E731
    return {"gather_ms": med(tg), "scatter_ms": med(ts), "commit_ms": med(tc),
            "step_ms": med(np.add(np.add(tg, ts), tc)),
            "step_ms_mean": float(np.mean(np.add(np.add(tg, ts), tc)) * 1e3)}


def bench_store(sizes: list[int], dim: int, k: int, steps: int, workdir: Path, big_dtype_from: int,
                ram_max: int, reuse: bool) -> list[dict]:
    results = []
    for n in sizes:
        dtype = "float16" if n >= big_dtype_from else "float32"
        folder = workdir / f"store_bench_{n}_{dim}_{dtype}"
        try:
            need = n * dim * np.dtype(dtype).itemsize
            free = shutil.disk_usage(workdir).free
            if need * 1.1 > free:
                results.append({"N": n, "dtype": dtype, "skipped": f"needs {need / 2**30:.1f} GiB, "
                                f"{free / 2**30:.1f} GiB free"})
                continue
            if reuse and (folder / "manifest.json").is_file():
                t_make = None
                print(f"N={n:,} {dtype}: reusing {folder}", flush=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                t_make = make_store(folder, n, dim, dtype)
                print(f"N={n:,} {dtype}: made {need / 2**30:.2f} GiB in {t_make:.1f}s", flush=True)
            runs = [("mmap", "cold", False), ("mmap", "warm", False), ("mmap", "warm", True)]
            if need <= ram_max:
                runs += [("ram", "warm", False), ("ram", "warm", True)]
            for cache, state, durable in runs:
                if state == "cold":
                    drop_file_cache(folder / FILENAME)
                else:
                    prefault(folder / FILENAME)
                rss0 = anon_rss_mib()
                t_open = time.perf_counter()
                with PrototypeStore.open(folder, "r+", cache=cache, durable=durable) as s:
                    t_open = time.perf_counter() - t_open
                    if state == "warm":
                        run_steps(s, n, k, 5, seed=2)  # warm-up
                    r = run_steps(s, n, k, steps if state == "warm" else min(steps, 20), seed=3)
                    r["anon_rss_mib"] = round(anon_rss_mib(), 1)
                row = {"N": n, "D": dim, "K": k, "dtype": dtype, "cache": cache, "page_cache": state,
                       "durable": durable, "store_gib": round(need / 2**30, 3),
                       "make_s": None if t_make is None else round(t_make, 1), "open_s": round(t_open, 2),
                       "anon_rss_before_open_mib": round(rss0, 1), **{a: round(b, 3) for a, b in r.items()}}
                results.append(row)
                print(row, flush=True)
        finally:
            if not reuse:
                shutil.rmtree(folder, ignore_errors=True)
    return results


def bench_imprint(data: Path, workdir: Path, batch_size: int, workers: int, input_size: int,
                  limit: int) -> dict:
    import torch

    from lblctl.data.faces import FaceDataset, Preprocess, make_loader, open_face_set
    from lblctl.models.backbones import create_backbone
    from lblctl.models.checkpoint import load_backbone, save_backbone
    from lblctl.stages.imprint import ImprintConfig, imprint

    folder = Path(tempfile.mkdtemp(prefix="imprint_", dir=workdir))
    try:
        torch.manual_seed(0)
        model = create_backbone("small_cnn", 512, input_size, width=32).eval()
        save_backbone(folder / "backbone.pt", model, arch="small_cnn", embedding_size=512,
                      preprocess=Preprocess(input_size, 0.6), arch_kwargs={"width": 32})
        bb = load_backbone(folder / "backbone.pt")
        index = open_face_set(data)
        rows = index.select_images("all")[:limit]
        # pure forward over the same batches, decoded beforehand
        loader = make_loader(FaceDataset(index, rows, None, bb.preprocess), batch_size=batch_size, workers=0)
        batches = [b.images for b in loader]
        bb.embed(batches[0])

        def forward() -> float:
            t = time.perf_counter()
            for x in batches:
                bb.embed(x)
            return time.perf_counter() - t

        forward_before = forward()
        images = sum(len(x) for x in batches)
        # the whole imprint (decode in workers + forward + accumulate + store)
        ids = index.image_identity[rows]
        sub = folder / "faces.csv"
        with open(sub, "w") as fh:
            fh.write("identity,image\n")
            for r, i in zip(rows, ids, strict=True):
                fh.write(f"{index.names[int(i)]},{index.path(int(r))}\n")
        t = time.perf_counter()
        summary = imprint(ImprintConfig(out=folder / "store", data=sub, backbone=folder / "backbone.pt",
                                        photos="all", batch_size=batch_size, workers=workers))
        imprint_s = time.perf_counter() - t
        forward_s = (forward_before + forward()) / 2  # before and after: the box's load drifts
        return {"data": str(data), "images": images, "batch_size": batch_size, "workers": workers,
                "arch": f"small_cnn width 32, {input_size}px, D=512",
                "forward_img_s": round(images / forward_s, 1),
                "imprint_img_s_embed_phase": summary["images_per_second"],
                "imprint_img_s_total": round(summary["images_embedded"] / imprint_s, 1),
                "ratio_embed_phase": round(summary["images_per_second"] / (images / forward_s), 3),
                "ratio_total": round(summary["images_embedded"] / imprint_s / (images / forward_s), 3)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 10k, 100k; 20 steps; 100 images (seconds)")
    ap.add_argument("--sizes", default="10000,100000,1000000,10000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--float16-from", type=int, default=10_000_000, help="use float16 from this N on")
    ap.add_argument("--ram-max-gib", type=float, default=2.0, help="also run the RAM cache up to this size")
    ap.add_argument("--dir", type=Path, default=Path("/work/tmp") if Path("/work/tmp").is_dir()
                    else Path(tempfile.gettempdir()))
    ap.add_argument("--imprint-data", type=Path, default=REPO / "examples" / "data" / "faces")
    ap.add_argument("--imprint-images", type=int, default=500)
    ap.add_argument("--imprint-batch", type=int, default=64)
    ap.add_argument("--imprint-workers", type=int, default=1)
    ap.add_argument("--input-size", type=int, default=112)
    ap.add_argument("--skip-imprint", action="store_true")
    ap.add_argument("--skip-store", action="store_true", help="only the imprint part (results: store_bench_imprint)")
    ap.add_argument("--reuse", action="store_true", help="keep the stores in --dir and reuse them next time")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.steps, args.imprint_images = "10000,100000", 20, 100
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"disk free in {args.dir}: {shutil.disk_usage(args.dir).free / 2**30:.1f} GiB", flush=True)
    store_rows = [] if args.skip_store else bench_store(sizes, args.dim, args.k, args.steps, args.dir,
                                                        args.float16_from, int(args.ram_max_gib * 2**30), args.reuse)
    imp = None if args.skip_imprint else bench_imprint(args.imprint_data, args.dir, args.imprint_batch,
                                                       args.imprint_workers, args.input_size,
                                                       args.imprint_images)
    md = ["## gather + scatter + commit of K random rows", "",
          "| N | dtype | cache | page cache | durable | open s | step ms (median) | step ms (mean) | gather ms "
          "| scatter ms | commit ms | anon RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in store_rows:
        if "skipped" in r:
            md.append(f"| {r['N']:,} | {r['dtype']} | – | – | – | skipped: {r['skipped']} | | | | | | |")
            continue
        md.append(f"| {r['N']:,} | {r['dtype']} | {r['cache']} | {r['page_cache']} | {r['durable']} | {r['open_s']} | "
                  f"{r['step_ms']:.2f} | {r['step_ms_mean']:.2f} | {r['gather_ms']:.2f} | {r['scatter_ms']:.2f} | "
                  f"{r['commit_ms']:.2f} | {r['anon_rss_mib']:.0f} |")
    md.append(f"\nK = {args.k}, D = {args.dim}; warm: the file read once into the page cache, 5 warm-up + "
              f"{args.steps} timed steps; cold: first {min(args.steps, 20)} steps after dropping the file's "
              "pages (posix_fadvise DONTNEED). A step = gather K rows + scatter them back + commit (write-ahead "
              "log, apply, drop log); durable = fsync at every commit. open s includes mmap pre-faulting "
              "(writers, when the rows fit in 80 % of the available memory) or the RAM load. anon RSS excludes the "
              "mapped file's pages; the peak RSS of the run (which includes them) was "
              f"{peak_rss_mib():.0f} MiB. make s (creating the store by the fast direct path): "
              + ", ".join(f"N={r['N']:,}: {r['make_s']}" for r in store_rows if r.get("cache") == "mmap"
                          and r.get("page_cache") == "cold") + " (None = reused from an earlier run).")
    if imp:
        md += ["", "## imprint vs pure forward", "",
               f"{imp['images']} images of {imp['data']}, {imp['arch']}, batch {imp['batch_size']}, "
               f"{imp['workers']} decode worker(s): forward only {imp['forward_img_s']} img/s; imprint "
               f"{imp['imprint_img_s_embed_phase']} img/s during embedding (ratio {imp['ratio_embed_phase']}), "
               f"{imp['imprint_img_s_total']} img/s end to end with store writing (ratio {imp['ratio_total']})."]
    name = "store_bench_imprint" if args.skip_store else "store_bench"
    path = write_results(name, {"args": {k: str(v) for k, v in vars(args).items()}, "store": store_rows,
                                "imprint": imp}, "\n".join(md))
    print("\n".join(md))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
