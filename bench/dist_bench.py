"""train-dp under torchrun (gloo, CPU): per-rank memory vs N, 1 rank vs 2 ranks s/step, bytes per step.

    nice -n 10 python bench/dist_bench.py --sizes 10000,1000000 --time-n 1000000
    nice -n 10 python bench/dist_bench.py --sizes 10000,1000000,10000000   # float16 from 5M rows on

Head-only (features for 20,000 identities, as bench/dp_bench.py's memory part; the store is what scales).
Steady-state s/step: the time between the first and the last optimiser step / the steps between.
Each size: a store sharded for 2 ranks (written shard by shard, in the layout of lblctl.core.shards),
``torchrun --nproc-per-node 2`` of train-dp, every rank reporting its anonymous RSS (before/after
training, peak) and the payload of every collective it issued (torch.distributed calls counted by
wrapping them; per step = the bytes between the first and the last optimiser step / the steps between).
At ``--time-n`` the same run in one process over a plain store gives the 1-rank s/step.

Results: bench/results/dist_dp.json and .md (with the machine and the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import anon_rss_mib, peak_rss_mib, write_results  # noqa: E402
from dp_bench import _unit, make_synthetic_store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FEATURE_IDS = 20_000


def make_sharded_store(folder: Path, n: int, d: int, dtype: str, world: int, cq: int = 8, dq: int = 4,
                       seed: int = 0) -> None:
    """N random unit rows (+ momentum), random candidate queues of global rows, written straight into
    ``world`` shards (row r in shard r % world), then shards.json: a sharded store without a plain one."""
    from lblctl.core.queues import Queues
    from lblctl.core.shards import ShardLayout, shard_dir, write_layout
    from lblctl.core.store import PrototypeStore
    from lblctl.core.strings import StringArray

    rng = np.random.default_rng(seed)
    chunk = 200_000
    for r in range(world):
        rows = np.arange(r, n, world)
        folder_r = shard_dir(folder, r, world)
        names = StringArray.from_iter(f"synthetic_{g:08d}" for g in rows.tolist())
        store = PrototypeStore.create(folder_r, d, names, dtype=dtype, momentum=True)
        for start in range(0, len(rows), chunk):
            store.fill(start, _unit(rng, min(chunk, len(rows) - start), d))
        store.close()
        w = Queues.create(folder_r / "queues.h5", len(rows), cq, dq)
        for start in range(0, len(rows), chunk):
            g = rows[start:start + chunk][:, None]
            cand = (g + rng.integers(1, n, size=(len(g), cq))) % n
            w.write(start, cand.astype(np.int32), np.zeros((len(g), cq), np.float32))
        w.commit()
    write_layout(folder, ShardLayout(world, n, d))


def make_features(path: Path, n: int, d: int) -> None:
    import h5py

    ids = min(n, FEATURE_IDS)
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f["features"] = _unit(rng, 2 * ids, d)
        f["identities"] = np.array([f"synthetic_{i // 2:08d}" for i in range(2 * ids)], dtype=object
                                   ).astype(h5py.string_dtype())


# ----------------------------------------------------------------------------- one rank's run
def child(store: Path, features: Path, out: Path, k: int, steps: int, report: Path) -> None:
    """Train (under torchrun or alone), counting every collective's payload; write this rank's report."""
    import torch
    import torch.distributed as dist

    from lblctl.stages.train_dp import TrainDPConfig, run
    from lblctl.train import engine
    from lblctl.train.engine import TrainConfig

    sent = {"bytes": 0, "calls": 0}
    marks: list[tuple[int, int, float]] = []

    def counted(fn, payload):  # noqa: ANN001, ANN202
        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            sent["bytes"] += payload(*a, **kw)
            sent["calls"] += 1
            return fn(*a, **kw)
        return wrapper

    def size(t) -> int:  # noqa: ANN001
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    dist.all_reduce = counted(dist.all_reduce, lambda t, *a, **kw: size(t))
    dist.all_gather = counted(dist.all_gather, lambda parts, t, *a, **kw: size(t))
    step_fn = engine.Trainer.backward_step

    def backward_step(self, loss):  # noqa: ANN001, ANN202
        marks.append((sent["bytes"], sent["calls"], time.perf_counter()))  # before this step's backward
        return step_fn(self, loss)

    engine.Trainer.backward_step = backward_step
    rank = int(os.environ.get("RANK", "0"))
    rss0 = anon_rss_mib()
    cfg = TrainDPConfig(store=store, out=out, features=features, classes=k, sampled=k // 4, photos_per_class=2,
                        workers=1, train=TrainConfig(steps=steps, lr=0.1, weight_decay=0.0, schedule="constant",
                                                     log_every=max(1, steps // 4), checkpoint_every=0, seed=0))
    s = run(cfg, "cpu").figures
    per_step = [(marks[-1][i] - marks[0][i]) / (len(marks) - 1) if len(marks) > 1 else None for i in range(3)]
    report.write_text(json.dumps({
        "rank": rank, "seconds_per_step": per_step[2], "seconds_per_step_with_start_and_end":
        s["seconds"] / max(1, s["steps_this_run"]),
        "anon_rss_mib_before": round(rss0, 1), "anon_rss_mib_after": round(anon_rss_mib(), 1),
        "peak_rss_mib": round(peak_rss_mib(), 1), "bytes_sent_per_step": per_step[0],
        "collectives_per_step": per_step[1], "classes": s.get("classes"), "steps": s.get("steps"),
    }))


THREADS = {"per_process": 0}  # 0: cores / processes


def launch(store: Path, features: Path, work: Path, k: int, steps: int, nproc: int) -> list[dict]:
    out = work / f"run{nproc}"
    shutil.rmtree(out, ignore_errors=True)
    args = [str(Path(__file__).resolve()), "--child", "--store", str(store), "--features", str(features),
            "--out", str(out), "--k", str(k), "--steps", str(steps), "--report", str(work / f"report{nproc}")]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
           if nproc > 1 else [sys.executable, *args])
    threads = THREADS["per_process"] or max(1, (os.cpu_count() or 2) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    reports = []
    for r in range(nproc):
        path = work / f"report{nproc}" if nproc == 1 else work / f"report{nproc}.rank{r}"
        reports.append(json.loads(path.read_text()))
    return reports


def formula(b: int, k: int, s: int, dq: int, d: int, w: int) -> dict[str, object]:
    """Payload each rank hands to collectives per head-only step (bytes), from the code's collectives."""
    local = -(-b // w)  # the largest rank's slice: all_gather pads every part to it
    terms = {
        "selection: S×dq int64 all-reduce": 8 * s * dq,
        "batch sizes: all-gather int64": 8,
        "embeddings: all-gather local×D float32": 4 * local * d,
        "labels: all-gather local int64": 8 * local,
        "softmax max + (sum, target): all-reduce 3·B float32": 4 * 3 * b,
        "hardest wrong + accuracy: all-reduce 3·B float32 + B int64": 4 * 3 * b + 8 * b,
        "clip norm: all-reduce float64": 8,
    }
    return {"terms": terms, "total": sum(terms.values()),
            "text": "8·S·dq + 8 + 4·⌈B/W⌉·D + 8·⌈B/W⌉ + 12·B + 20·B + 8 bytes per rank (head-only; with a trained "
                    "backbone add 4·B·D for the embeddings' gradient all-reduce and DDP's 4·params); "
                    "independent of N"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--time-n", type=int, default=1_000_000, help="also run 1 rank at this N (0: skip)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (1 process, 2 processes) at --time-n")
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per process (0: cores / processes)")
    ap.add_argument("--name", default="dist_dp", help="results file name (bench/results/NAME.json, .md)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--features", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rank = os.environ.get("RANK")
        report = Path(args.report if rank is None else f"{args.report}.rank{rank}")
        child(Path(args.store), Path(args.features), Path(args.out), args.k, args.steps, report)
        return
    THREADS["per_process"] = args.threads
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dist_bench_", dir=os.environ.get("TMPDIR", "/tmp")))
    rows = []
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            work = scratch / f"n{n}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            dtype = "float16" if n >= 5_000_000 else "float32"
            t0 = time.perf_counter()
            make_sharded_store(work / "sharded", n, args.d, dtype, 2)
            make_features(work / "feats.h5", n, args.d)
            row = {"n": n, "dtype": dtype, "d": args.d, "k": args.k, "steps": args.steps,
                   "build_s": round(time.perf_counter() - t0, 1), "load_before": os.getloadavg()}
            row["ranks2"] = launch(work / "sharded", work / "feats.h5", work, args.k, args.steps, 2)
            if n == args.time_n:  # 1 process vs 2, alternating on the same stores (the load drifts)
                make_synthetic_store(work / "plain", n, args.d, dtype)
                row["timing"] = []
                for _ in range(args.repeats):
                    for nproc, store in ((1, work / "plain"), (2, work / "sharded")):
                        load = os.getloadavg()
                        reps = launch(store, work / "feats.h5", work, args.k, args.steps, nproc)
                        row["timing"].append({"processes": nproc, "seconds_per_step": reps[0]["seconds_per_step"],
                                              "load_before": load, "rank0": reps[0]})
            row["load_after"] = os.getloadavg()
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work, ignore_errors=True)
            save(rows, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(render(save(rows, args)))


def save(rows: list[dict], args: argparse.Namespace) -> dict:
    """Write the results so far (a long run that dies keeps its finished sizes)."""
    results = {"rows": rows, "formula": formula(2 * args.k, args.k, args.k // 4, 4, args.d, 2), "world": 2,
               "threads": args.threads,
               "command": " ".join(sys.argv)}
    write_results(args.name, results, render(results))
    return results

def render(r: dict) -> str:
    md = ["## 2-rank head-only train-dp (gloo, CPU): per-rank memory vs N", "",
          "| N | dtype | rank | s/step | anon RSS MiB before → after | peak RSS MiB | bytes sent/step | "
          "collectives/step | load avg before → after |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        for rep in x["ranks2"]:
            md.append(f"| {x['n']:,} | {x['dtype']} | {rep['rank']} of 2 | {rep['seconds_per_step']:.3f} | "
                      f"{rep['anon_rss_mib_before']} → {rep['anon_rss_mib_after']} | {rep['peak_rss_mib']} | "
                      f"{rep['bytes_sent_per_step'] or 0:,.0f} | {rep['collectives_per_step']} | "
                      f"{' '.join(f'{v:.1f}' for v in x['load_before'])} → "
                      f"{' '.join(f'{v:.1f}' for v in x['load_after'])} |")
    timed = [x for x in r["rows"] if x.get("timing")]
    for x in timed:
        md += ["", f"## 1 process vs 2 processes at N = {x['n']:,} (same K, S, global batch; alternating runs)", "",
               "| run | processes | s/step (steady state) | anon RSS MiB after (rank 0) | load avg before |",
               "|---|---|---|---|---|"]
        for i, t in enumerate(x["timing"]):
            md.append(f"| {i + 1} | {t['processes']} | {t['seconds_per_step']:.3f} | "
                      f"{t['rank0']['anon_rss_mib_after']} | {' '.join(f'{v:.1f}' for v in t['load_before'])} |")
    f = r["formula"]
    rows = r["rows"]
    md += ["", f"K = {rows[0]['k'] if rows else '?'}, S = K/4, 2 features per class for the identities that have "
           f"features ({FEATURE_IDS:,} at most: at large N most dominant-queue classes bring none, so the global "
           f"batch B is smaller there), D = {rows[0]['d'] if rows else '?'}, dq = 4, W = {r['world']}; "
           f"OMP threads per process = {r.get('threads') or 'cores / processes'}.", "",
           "## Communication per step and rank (payload handed to torch.distributed)", "",
           f"Formula: {f['text']}.", "", "At B = 2K (every class brings 2 features):", "",
           "| term | bytes |", "|---|---|"]
    md += [f"| {t} | {v:,} |" for t, v in f["terms"].items()]
    md += [f"| **total** | **{f['total']:,}** |", "",
           "Measured: the `bytes sent/step` column (every all_reduce/all_gather input tensor between the first "
           "and the last optimiser step, per step); it equals the formula at the run's own B "
           f"({8 * (rows[0]['k'] // 4) * 4 + 16 if rows else 0:,} + "
           f"{4 * rows[0]['d'] // 2 + 4 + 32 if rows else 0}·B bytes at these K, S, D). "
           "A ring all-reduce moves about 2·(W−1)/W of its payload per rank on the wire; "
           "an all-gather receives (W−1)× what it sends."]
    return "\n".join(md)

if __name__ == "__main__":
    main()
