"""build-index at scale: the 50 nearest other prototypes of *every* row, on synthetic clustered
unit vectors (D = 512), with the index build-index would choose (or --index).

Per size: build time (train + add), search time (all N rows, queues written to an HDF5 file as
build-index does), peak RSS of that run (each size runs in its own process), and recall@50
against exact search on randomly sampled rows.

    /work/venv/bin/python bench/index_bench.py --quick                  # seconds
    /work/venv/bin/python bench/index_bench.py --sizes 100000,1000000 --recall-rows 2000

Data: N points around N/200 random centres (cluster sizes multinomial), each centre + noise of
norm ``--spread`` (1.0 ⇒ cosine ≈ 0.5 between two points of a cluster), renormalised.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mib, write_results  # noqa: E402


def clustered(n: int, d: int, seed: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clusters = max(16, n // 200)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    label = rng.integers(0, clusters, n)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        v = centres[label[s:e]] + spread * rng.standard_normal((e - s, d)).astype(np.float32) / np.sqrt(d)
        x[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x


def run_one(n: int, args: argparse.Namespace) -> dict:
    import faiss

    from lblctl.core.queues import Queues
    from lblctl.stages.index import ArraySource, build_index, choose_index, exact_knn, recall_at_k, search_all

    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    t0 = time.perf_counter()
    x = clustered(n, args.dim, args.seed, args.spread)
    gen_s = time.perf_counter() - t0
    source = ArraySource(x)
    k = args.k
    spec = choose_index(n, args.dim, k, args.index, nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search)
    t0 = time.perf_counter()
    index = build_index(source, spec, seed=args.seed)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        with Queues.create(Path(tmp) / "queues.h5", n, k, min(20, k)) as writer:
            search_all(index, source, spec, k, writer.write, batch_size=4096)
            writer.commit()
        search_s = time.perf_counter() - t0
        del index
        rows = np.sort(np.random.default_rng(args.seed + 1).choice(n, size=min(n, args.recall_rows), replace=False))
        t0 = time.perf_counter()
        exact, _ = exact_knn(source, rows, k)
        exact_s = time.perf_counter() - t0
        with Queues.open(Path(tmp) / "queues.h5") as q:
            recall = recall_at_k(q.candidates(rows), exact)
    return {"n": n, "dim": args.dim, "k": k, "index": spec.as_dict(), "threads": args.threads,
            "data_s": round(gen_s, 1), "build_s": round(build_s, 1), "search_s": round(search_s, 1),
            "total_s": round(build_s + search_s, 1), "recall_at_k": round(recall, 4), "recall_rows": len(rows),
            "exact_check_s": round(exact_s, 1), "peak_rss_mib": round(peak_rss_mib()),
            "vectors_mib": round(x.nbytes / 2**20)}


def _child_args(argv: list[str]) -> list[str]:
    """The parent's options minus those only the parent uses (--quick, --store PATH)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--store":
            skip = True
        elif a != "--quick" and not a.startswith("--store="):
            out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated N")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--index", default="auto")
    ap.add_argument("--nlist", type=int, default=0)
    ap.add_argument("--nprobe", type=int, default=0)
    ap.add_argument("--ef-search", type=int, default=0)
    ap.add_argument("--spread", type=float, default=1.0)
    ap.add_argument("--recall-rows", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="folder for the temporary queue files")
    ap.add_argument("--quick", action="store_true", help="N = 20k, D = 128, 500 recall rows (seconds)")
    ap.add_argument("--store", default=None, help="also run build-index on this real store (writes its "
                    "index.faiss, queues.h5, duplicates.csv into it)")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--name", default="index_bench")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.dim, args.recall_rows, args.index = "20000", 128, 500, "ivf"
        args.name = args.name + "_quick" if args.name == "index_bench" else args.name
    if args.one:  # child: one size, its own peak RSS
        os.environ["LBLCTL_QUIET"] = "1"
        from lblctl.core import ui

        ui.set_quiet(True)
        print(json.dumps(run_one(args.one, args)))
        return
    results = []
    real = None
    if args.store:
        from lblctl.stages.index import BuildIndexConfig, build_store_index

        t0 = time.perf_counter()
        real = build_store_index(BuildIndexConfig(store=Path(args.store), candidates=args.k,
                                                  dominant=min(20, args.k), index=args.index,
                                                  recall_rows=args.recall_rows))
        real["wall_s"] = round(time.perf_counter() - t0, 1)
        real["peak_rss_mib_parent"] = round(peak_rss_mib())
    for n in [int(s) for s in args.sizes.split(",") if s]:
        cmd = [sys.executable, __file__, "--one", str(n)] + [
            a for a in _child_args(sys.argv[1:])]
        if args.quick:
            cmd += ["--dim", str(args.dim), "--recall-rows", str(args.recall_rows), "--index", args.index]
        print(f"N = {n} …", file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"N = {n} failed")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(r), file=sys.stderr)
        results.append(r)
    lines = [f"| N | D | index | build s | search s | total s | recall@{args.k} (rows) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ix = r["index"]
        knobs = ", ".join(f"{k}={v}" for k, v in ix.items() if k not in ("kind", "reason", "train_rows"))
        lines.append(f"| {r['n']:,} | {r['dim']} | {ix['kind']} ({knobs}) | {r['build_s']} | {r['search_s']} | "
                     f"{r['total_s']} | {r['recall_at_k']} ({r['recall_rows']}) | {r['peak_rss_mib']} |")
    md = (f"Synthetic clustered unit vectors (N/200 centres, spread {args.spread:.2f}), {args.k}-NN of every "
          f"row, {args.threads} threads.\n\n") + "\n".join(lines)
    if real is not None:
        md += (f"\n\nReal store {args.store}: {real['identities']} identities × {real['embedding_size']}, "
               f"{real['index']['kind']} index, build {real['build_s']} s, search {real['search_s']} s, "
               f"recall@{args.k} {real['recall_at_k']} ({real['recall_note']}), {real['duplicates']} suspected "
               f"duplicates at cosine ≥ {real['dup_threshold']} ({real['dup_threshold_rule']}).")
    path = write_results(args.name, {"results": results, "real_store": real, "args": vars(args)}, md)
    print(md)
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
