"""train-dp benchmarks: memory vs N (head-only), store-traffic overhead, accuracy on real faces.

    python bench/dp_bench.py --part memory --sizes 10000,100000,1000000
    python bench/dp_bench.py --part overhead --n 1000000
    python bench/dp_bench.py --part accuracy
    python bench/dp_bench.py --quick            # all three, small
    python bench/dp_bench.py --part scale --sizes 10000,100000,1000000,10000000 \
        --pfc-path /path/to/arcface_torch/partial_fc_v2.py   # issue 18: s/step vs N, beside Partial FC
        [--scratch DIR --keep]   # keep (and reuse) the synthetic stores: a 10M float16 store is 21 GB

Results: bench/results/dp_bench.json and .md (merged per part, with the machine); the scale part
writes bench/results/dp_scale.json and .md.
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
from _common import RESULTS, anon_rss_mib, machine, peak_rss_mib, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LBLCTL_SHARED", REPO.parent / "shared"))
LFW = SHARED / "data" / "lfw"


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_synthetic_store(folder: Path, n: int, d: int, dtype: str, names: list[str] | None = None,
                         cq: int = 8, dq: int = 4, seed: int = 0, backbone_fingerprint: str | None = None) -> None:
    """A store of N random unit rows (+ momentum) and random candidate queues, written in chunks."""
    from lblctl.core.queues import Queues
    from lblctl.core.store import PrototypeStore
    from lblctl.core.strings import StringArray

    rng = np.random.default_rng(seed)
    given = names or []
    all_names = StringArray.from_iter(given[i] if i < len(given) else f"synthetic_{i:08d}" for i in range(n))
    store = PrototypeStore.create(folder, d, all_names, dtype=dtype, momentum=True,
                                  backbone_fingerprint=backbone_fingerprint)
    chunk = 200_000
    for start in range(0, n, chunk):
        store.fill(start, _unit(rng, min(chunk, n - start), d))
    store.close()
    w = Queues.create(folder / "queues.h5", n, cq, dq)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        rows = np.arange(start, start + m)[:, None]
        cand = (rows + rng.integers(1, n, size=(m, cq))) % n
        w.write(start, cand.astype(np.int32), np.zeros((m, cq), np.float32))
    w.commit()


def write_features(path: Path, rows: np.ndarray, d: int, rng: np.random.Generator) -> None:
    """A features file with two random unit "photos" of each of ``rows`` (named as the synthetic store names them)."""
    import h5py

    with h5py.File(path, "w") as f:
        f["features"] = _unit(rng, 2 * len(rows), d)
        f["identities"] = np.array([f"synthetic_{i:08d}" for i in np.repeat(rows, 2)], dtype=object
                                   ).astype(h5py.string_dtype())


# ----------------------------------------------------------------------------- memory (head-only)


def memory_child(n: int, d: int, k: int, steps: int, work: Path) -> dict:
    import torch

    from lblctl.stages.train_dp import TrainDPConfig, train_dp
    from lblctl.train.engine import TrainConfig

    t0 = time.perf_counter()
    dtype = "float16" if n >= 5_000_000 else "float32"
    make_synthetic_store(work / "store", n, d, dtype)
    # photos (features) only for some identities: the store is what scales
    write_features(work / "feats.h5", np.arange(min(n, 20_000)), d, np.random.default_rng(1))
    build_s = time.perf_counter() - t0
    rss_before = anon_rss_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainDPConfig(store=work / "store", out=work / "run", features=work / "feats.h5", classes=k,
                        sampled=k // 4, photos_per_class=2, workers=1,
                        train=TrainConfig(steps=steps, lr=0.1, weight_decay=0.0, schedule="constant",
                                          log_every=max(1, steps // 4), checkpoint_every=0, seed=0))
    s = train_dp(cfg, device)
    return {
        "n": n, "d": d, "k": k, "dtype": dtype, "steps": steps, "build_s": round(build_s, 1),
        "seconds_per_step": s["seconds"] / max(1, s["steps_this_run"]),
        "anon_rss_mib_before_training": round(rss_before, 1), "anon_rss_mib_after": round(anon_rss_mib(), 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "cuda_peak_mib": (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
        "store_bytes": sum(p.stat().st_size for p in (work / "store").iterdir()), "device": str(device),
    }


def run_memory(sizes: list[int], d: int, k: int, steps: int, scratch: Path) -> list[dict]:
    rows = []
    for n in sizes:
        work = scratch / f"mem_{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        out = subprocess.run([sys.executable, __file__, "--child-memory", str(n), "--d", str(d), "--k", str(k),
                              "--steps", str(steps), "--scratch", str(work)], capture_output=True, text=True)
        shutil.rmtree(work, ignore_errors=True)
        if out.returncode != 0:
            rows.append({"n": n, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- overhead (real backbone)


def run_overhead(n: int, steps: int, scratch: Path, k: int, batch: int, repeats: int = 2) -> dict:
    """Overlapped vs serial store traffic, measured back to back in one process.

    A first (discarded) run of each warms oneDNN's kernels and the page cache: whichever pipeline
    ran first used to pay that (~0.4 s/step over 20 steps), which read as an overlap penalty. Then
    ``repeats`` rounds in alternating order (serial, overlap, overlap, serial, …), each step timed
    from the log; the load average is recorded with every run since other work shares the cores.
    """
    import torch

    from lblctl.core.store import PrototypeStore
    from lblctl.data.faces import Preprocess, open_face_set
    from lblctl.models.backbones import create_backbone
    from lblctl.models.checkpoint import load_backbone, save_backbone
    from lblctl.stages.train_dp import TrainDPConfig, train_dp
    from lblctl.train.engine import TrainConfig

    faces = REPO / "examples" / "data" / "faces"
    index = open_face_set(faces)
    torch.manual_seed(0)
    model = create_backbone("small_cnn", 512, 64)
    save_backbone(scratch / "bb" / "backbone.pt", model, arch="small_cnn", embedding_size=512,
                  preprocess=Preprocess(64, 0.6), arch_kwargs={})
    fp = load_backbone(scratch / "bb").fingerprint
    store = scratch / "store"  # one store for every run: its values do not change the timing
    make_synthetic_store(store, n, 512, "float32", names=list(index.names), backbone_fingerprint=fp)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {"n": n, "k": k, "batch_images": batch, "steps": steps, "backbone": "small_cnn 64 px, 512-d",
                 "torch_threads": torch.get_num_threads(), "runs": []}
    order = [("warmup", False), ("warmup", True)]
    for r in range(repeats):
        pair = [False, True] if r % 2 == 0 else [True, False]
        order += [(f"round{r}", overlap) for overlap in pair]
    for i, (tag, overlap) in enumerate(order):
        with PrototypeStore.open(store, "r+") as s:
            s.set_backbone_fingerprint(fp)  # train-dp hands the store to its new backbone: hand it back
        run = scratch / f"run_{i}"
        load0 = Path("/proc/loadavg").read_text().split()[0]
        cfg = TrainDPConfig(store=store, out=run, data=faces, backbone=scratch / "bb", classes=k, sampled=16,
                            photos_per_class=2, batch_size=batch, workers=1, overlap=overlap,
                            train=TrainConfig(steps=steps, lr=0.01, schedule="constant", log_every=1,
                                              checkpoint_every=0, seed=i))
        s = train_dp(cfg, device)
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        inv = np.array([1.0 / x["samples_per_s"] for x in log if "samples_per_s" in x])
        dts = list(s["seconds"] * inv / inv.sum())  # per-step times (a step's images vary little)
        rec = {"round": tag, "pipeline": "overlap" if overlap else "serial", "seconds_per_step": float(np.mean(dts)),
               "first_step_s": float(dts[0]), "seconds_per_step_after_first": float(np.mean(dts[1:] or dts)),
               "wait_for_data_s_per_step": s["wait_for_data_s"] / steps,
               "images_per_step": s["samples_per_s"] * s["seconds"] / steps,
               "loadavg": f"{load0}→{Path('/proc/loadavg').read_text().split()[0]}"}
        out["runs"].append(rec)
        print(rec, flush=True)
        shutil.rmtree(run, ignore_errors=True)
    for key in ("overlap", "serial"):
        runs = [x for x in out["runs"] if x["pipeline"] == key and x["round"] != "warmup"]
        v = [x["seconds_per_step_after_first"] for x in runs]
        w = [x["wait_for_data_s_per_step"] for x in runs]
        out[key] = {"seconds_per_step": float(np.median(v)), "seconds_per_step_range": [min(v), max(v)],
                    "wait_for_data_s_per_step": float(np.median(w)),
                    "overhead_vs_resident": float(np.median(w)) / max(1e-9, float(np.median(v)) - float(np.median(w)))}
    shutil.rmtree(store, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- scale (issue 18)

_PARTS = {  # part of a step: the functions whose time it is (module, class, method)
    "sampler": [("lblctl.train.dp", "DominantSampler", "select")],  # this step's rows and the lookahead's
    "prefetch": [("lblctl.core.store", "PrototypeStore", "prefetch")],  # store thread: readahead of steps ahead
    "gather": [("lblctl.core.store", "PrototypeStore", "gather"),
               ("lblctl.core.store", "PrototypeStore", "gather_momentum")],
    # store thread: stage and commit a step's rows (a provisional commit: a cache insert; with a spill inside it,
    # its undo record and file writes count here too)
    "write_back": [("lblctl.core.store", "PrototypeStore", "scatter"),
                   ("lblctl.core.store", "PrototypeStore", "commit"),
                   ("lblctl.core.store", "PrototypeStore", "_flush_cache")],
    # log records outside a commit, and the queues' undo records (main thread)
    "journal": [("lblctl.core.store", "PrototypeStore", "_append"),
                ("lblctl.core.undo", "UndoJournal", "record"), ("lblctl.core.undo", "UndoJournal", "first_touch")],
    "queue_update": [("lblctl.core.queues", "Queues", "promote")],
    "checkpoint_flush": [("lblctl.core.store", "PrototypeStore", "flush"),  # main thread, at checkpoints
                         ("lblctl.core.store", "PrototypeStore", "checkpoint")],
    "background_write_back": [("lblctl.core.store", "PrototypeStore", "_write_back")],  # the flusher thread
}


def _disk_stat_path(path: Path) -> Path | None:
    """The block device's ``stat`` file for the disk holding ``path`` (Linux; None elsewhere)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if stat.is_file() else None


def _disk_counts(stat: Path | None) -> tuple[float, float, float, float]:
    """Reads completed, bytes read, writes completed, bytes written on that device so far (the whole
    machine's traffic to it: on a quiet box, the run's)."""
    if stat is None:
        return (0.0, 0.0, 0.0, 0.0)
    f = [int(v) for v in stat.read_text().split()]
    return (f[0], f[2] * 512.0, f[4], f[6] * 512.0)


def _instrument(disk: Path | None = None) -> tuple[dict[str, float], list[tuple[float, ...]]]:
    """Wrap the step's parts with timers (a bench, not a test: timing only, behaviour unchanged)."""
    import functools
    import importlib
    import threading

    totals = {k: 0.0 for k in _PARTS}
    stamps: list[tuple[float, ...]] = []  # per step: wall, main thread's CPU, the process's CPU, disk counts
    stat = _disk_stat_path(disk) if disk is not None else None
    depth = threading.local()
    for part, targets in _PARTS.items():
        for mod, cls, meth in targets:
            klass = getattr(importlib.import_module(mod), cls)
            orig = getattr(klass, meth)

            def timed(*a, _orig=orig, _part=part, **kw):
                if getattr(depth, "on", False):  # nested (gather inside undo journaling): count once
                    return _orig(*a, **kw)
                depth.on = True
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    depth.on = False
                    totals[_part] += time.perf_counter() - t0

            setattr(klass, meth, functools.wraps(orig)(timed))
    from lblctl.train.streamer import StoreStreamer

    handed = StoreStreamer.next

    def stamped(self, _orig=handed):  # StoreStreamer.next runs once per step: its spacing is the step time
        t = os.times()
        stamps.append((time.perf_counter(), time.thread_time(), t.user + t.system, *_disk_counts(stat)))
        return _orig(self)

    StoreStreamer.next = functools.wraps(handed)(stamped)  # type: ignore[method-assign]
    return totals, stamps


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (written back first): a cold start for them alone,
    without emptying the whole machine's cache under the other users of a shared box."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(paths: list[Path], chunk: int = 16 << 20) -> float:
    """Read these files through the page cache, in order: a warm start even for a store that no earlier run
    left there (a cold run evicts it). At 10M the store is most of this box's RAM, so the kernel still decides
    how much of it stays; the disk reads per step show it. Returns the seconds it took."""
    t0, buf = time.perf_counter(), bytearray(chunk)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            offset = 0
            while got := os.preadv(fd, [buf], offset):
                offset += got
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def disk_read_iops(path: Path, reads: int = 4096, seed: int | None = None) -> dict[str, float]:
    """Random 4 KB reads per second the disk serves from ``path``, all asked for at once
    (``posix_fadvise(WILLNEED)``, as the store's read-ahead does), then read; the file's pages are evicted
    before and after. ``fresh``: pages drawn anew (``seed`` None: from the OS), so that no cache under this
    machine (a VM host's) can have kept them from an earlier probe; ``again``: the same pages once more,
    after evicting them here: what such a cache serves. A cold step's floor is its disk reads ÷ ``fresh``."""
    pages = max(1, path.stat().st_size // 4096)
    offsets = (np.unique(np.random.default_rng(seed).integers(0, pages, reads)) * 4096).tolist()
    rates = {}
    for kind in ("fresh", "again"):
        evict([path])
        fd = os.open(path, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            for off in offsets:
                os.posix_fadvise(fd, off, 4096, os.POSIX_FADV_WILLNEED)
            for off in offsets:
                os.pread(fd, 4096, off)
            rates[kind] = len(offsets) / (time.perf_counter() - t0)
        finally:
            os.close(fd)
    evict([path])
    return rates


def fresh_features(work: Path, n: int, d: int, ids: int = 20_000) -> tuple[Path, int]:
    """A features file for ``ids`` identities drawn at random from the store's N (seed from the OS, returned):
    a cold run then gathers rows, and their queues' rows, that no earlier run read, so neither this machine's
    page cache nor a cache under it (a VM host's) can serve them; the kept ``feats.h5`` always names the
    first 20k identities, whose rows such a cache holds after one run."""

    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, ids), replace=False))
    path = work / "feats_fresh.h5"
    write_features(path, rows, d, rng)
    return path, seed


def scale_child(n: int, d: int, k: int, steps: int, work: Path, cold: bool, build: bool,
                checkpoint_every: int = 10, fresh_rows: bool = True) -> dict:
    import torch

    t0 = time.perf_counter()
    dtype = "float16" if n >= 5_000_000 else "float32"
    if build:
        make_synthetic_store(work / "store", n, d, dtype)
        write_features(work / "feats.h5", np.arange(min(n, 20_000)), d, np.random.default_rng(1))
    os.sync()  # the build's dirty pages are on the disk: their write-back must not throttle the steps
    build_s = time.perf_counter() - t0
    from lblctl.core.store import PrototypeStore
    from lblctl.stages.train_dp import TrainDPConfig, train_dp
    from lblctl.train.engine import TrainConfig

    feats, feats_seed, iops, warm_s = work / "feats.h5", None, {}, None
    files = [work / "store" / "prototypes.h5", work / "store" / "queues.h5"]
    if not cold:  # the other sizes' stores leave the page cache first: at 10M this one needs most of it
        evict([f for f in work.parent.glob("scale_*/store/*.h5") if f.parent != work / "store"])
        warm_s = warm_up([*files, feats])
    else:  # nothing of the run's files in the page cache, and no pre-faulting at open: every row from the disk
        if fresh_rows:
            feats, feats_seed = fresh_features(work, n, d)
        evict([*files, feats])
        PrototypeStore._populate = lambda self, populate: None  # type: ignore[method-assign]
        iops = disk_read_iops(files[0])
    flushes = {"wait": 0.0, "background": 0, "spilled_rows": 0}
    close = PrototypeStore.close

    def close_and_count(self, complete: bool = True, _orig=close) -> None:  # the store's own counters, at the end
        if self.mode == "r+" and not self._closed:
            flushes["wait"] += self.stats["flush_wait_s"]
            flushes["background"] += int(self.stats["background_flushes"])
            flushes["spilled_rows"] += int(self.stats["spilled_rows"])
        _orig(self, complete)

    PrototypeStore.close = close_and_count  # type: ignore[method-assign]
    totals, stamps = _instrument(work)
    rss_before = anon_rss_mib()
    out = work / ("run_cold" if cold else "run_warm")
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainDPConfig(store=work / "store", out=out, features=feats, classes=k,
                        sampled=k // 4, photos_per_class=2, batch_size=256, workers=1,
                        train=TrainConfig(steps=steps, lr=0.1, weight_decay=0.0, schedule="constant",
                                          log_every=steps, checkpoint_every=checkpoint_every, seed=0))
    s = train_dp(cfg, torch.device("cpu"))
    gaps, cpu_gaps, proc_gaps, reads, read_b, writes, write_b = np.diff(np.asarray(stamps).reshape(-1, 7), axis=0).T
    # StoreStreamer.next runs
    # once per step: its spacing is the step time
    steady = gaps[3:] if len(gaps) > 6 else gaps
    per = {p: v / steps for p, v in totals.items()}
    sps = float(np.median(steady))
    checkpoints = steps // checkpoint_every if checkpoint_every else 0
    return {
        "n": n, "d": d, "k": k, "batch": 256, "dtype": dtype, "steps": steps, "cache": "cold" if cold else "warm",
        "build_s": round(build_s, 1), "warm_up_s": warm_s, "s_per_step_median": sps,
        "s_per_step_mean": float(np.mean(steady)),
        "s_per_step_max": float(np.max(steady)), "checkpoint_every": checkpoint_every,
        "run_seconds": s["seconds"], "parts_s_per_step": per,
        "checkpoint_flush_s_each": totals["checkpoint_flush"] / max(1, checkpoints + 1),
        "background_write_back_s_total": totals["background_write_back"], "flush_wait_s_total": flushes["wait"],
        "background_flushes": flushes["background"], "spilled_rows": flushes["spilled_rows"],
        "wait_for_data_s_per_step": s["wait_for_data_s"] / steps,
        "compute_rest_s_per_step": sps - per["sampler"] - per["queue_update"] - s["wait_for_data_s"] / steps,
        # CPU seconds per step (medians over the same steps): of the main thread alone, and of the whole
        # process (every thread, kernel time included), against the 2 cores' 2 s per wall second
        "main_thread_cpu_s_per_step": float(np.median(cpu_gaps[3:])),
        "process_cpu_s_per_step": float(np.median(proc_gaps[3:])),
        # the disk under the store, per step (means over the same steps): what a cold page cache costs in
        # requests, and what the write-back adds
        "disk_reads_per_step": float(np.mean(reads[3:])), "disk_read_mb_per_step": float(np.mean(read_b[3:])) / 1e6,
        "disk_writes_per_step": float(np.mean(writes[3:])),
        "disk_write_mb_per_step": float(np.mean(write_b[3:])) / 1e6,
        "disk_read_iops": iops.get("fresh"), "disk_read_iops_again": iops.get("again"),
        "fresh_rows_seed": feats_seed,
        "store_write_cache_rows": s["store_write_cache_rows"], "store_flushes": s["store_flushes"],
        "anon_rss_mib_before": round(rss_before, 1), "anon_rss_mib_after": round(anon_rss_mib(), 1),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def pfc_child(n: int, d: int, rate: float, steps: int, pfc_path: str) -> dict:
    """arcface_torch's own PartialFC_V2 (loaded from a path, not vendored) in a 1-process gloo group."""
    import importlib.util
    import socket

    import torch
    from torch import distributed

    if not torch.cuda.is_available():  # its .cuda() calls become no-ops on a CPU-only machine
        torch.Tensor.cuda = lambda self, *a, **kw: self  # type: ignore[method-assign]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    spec = importlib.util.spec_from_file_location("partial_fc_v2", pfc_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def cosface(logits: torch.Tensor, labels: torch.Tensor, s: float = 64.0, m: float = 0.4) -> torch.Tensor:
        index = torch.where(labels != -1)[0]
        logits[index, labels[index].view(-1)] -= m
        return logits * s

    torch.manual_seed(0)
    pfc = mod.PartialFC_V2(cosface, d, n, sample_rate=rate, fp16=False)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    emb = torch.nn.functional.normalize(torch.randn(256, d))
    times = []
    for step in range(steps + 2):
        labels = torch.randint(0, n, (256,))
        t0 = time.perf_counter()
        loss = pfc(emb, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    distributed.destroy_process_group()
    return {"n": n, "rate": rate, "steps": steps, "s_per_step_median": float(np.median(times)),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def _child(args: list[str], lib: str | None = None) -> dict:
    """One child process; ``lib``: a checkout whose ``lblctl`` it imports instead of this one (a baseline)."""
    env = dict(os.environ)
    if lib:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(lib).resolve())] + ([env["PYTHONPATH"]] if env.get(
            "PYTHONPATH") else []))
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1], "args": args}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_scale(sizes: list[int], d: int, k: int, steps: int, scratch: Path, pfc_path: str | None,
              pfc_steps: int, pfc_max_n: dict[float, int], keep: bool = False, checkpoint_every: int = 10,
              steady_steps: int = 0, baseline: str | None = None, cold_same_rows: bool = False) -> dict:
    """Per N: build the store (or reuse a kept one), then lblctl warm, lblctl cold and Partial FC back to
    back, the order alternating from one N to the next (the shared box's load drifts). ``steady_steps``:
    also a long warm run with train-dp's default checkpoint interval (100), where the write-back of the
    rows a short run leaves to its end has to keep up with the steps. ``baseline``: a checkout of other
    code (``git worktree add ../base REV``); each lblctl run is repeated with its ``lblctl``, right before
    or after this code's, alternately. Every lblctl run at a larger N is paired with a run of the same kind at
    the smallest N right before it (``pairs``): the "× 10k" ratios divide by that one, as this box's speed
    drifts by tens of percent over minutes."""
    rows: list[dict] = []
    base_rows: list[dict] = []
    pfc: list[dict] = []
    pairs: list[dict] = []
    pair_args: dict[str, list[str]] = {}
    for i, n in enumerate(sizes):
        work = scratch / f"scale_{n}"
        built = (work / "store" / "manifest.json").is_file() and (work / "feats.h5").is_file()
        if not (keep and built):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        def lblctl_args(run_steps: int, every: int, n: int = n, work: Path = work) -> list[str]:
            return ["--child-scale", str(n), "--d", str(d), "--k", str(k), "--steps", str(run_steps), "--scratch",
                    str(work), "--checkpoint-every", str(every)]

        common = lblctl_args(steps, checkpoint_every)
        jobs: list[tuple[str, list[str]]] = [("warm", common + ([] if keep and built else ["--build"])),
                                             ("cold", common + ["--cold"] + (["--cold-same-rows"] if cold_same_rows
                                                                             else []))]
        if steady_steps:
            jobs.append(("steady", lblctl_args(steady_steps, 100)))
        if i == 0:
            pair_args = {kind: [a for a in args if a != "--build"] for kind, args in jobs}
        if pfc_path:
            jobs += [("pfc", ["--child-pfc", str(n), "--d", str(d), "--rate", str(rate), "--steps", str(pfc_steps),
                              "--pfc-path", pfc_path]) for rate, top in pfc_max_n.items() if n <= top]
        if i % 2:  # odd N: Partial FC first, then lblctl cold, then warm (the store is built by a first warm run)
            jobs = ([j for j in jobs if j[0] == "pfc"][::-1] + [j for j in jobs if j[0] == "cold"]
                    + [j for j in jobs if j[0] in ("warm", "steady")]) if keep and built else jobs
        for j, (kind, args) in enumerate(jobs):
            if i and kind in pair_args:  # the smallest N's run of this kind, right before
                res = {"n": sizes[0], "for_n": n, **_child(pair_args[kind]), "order": len(rows) + len(pfc)}
                pairs.append({**res, "cache": kind})
                print(json.dumps({**res, "pair": True}), flush=True)
            libs = [None] if kind == "pfc" or not baseline else [None, baseline][::1 if (i + j) % 2 else -1]
            for first, lib in zip((True, False), libs, strict=False):
                run_args = args if first else [a for a in args if a != "--build"]  # the first run built it
                res = {"n": n, **_child(run_args, lib), "order": len(rows) + len(pfc) + len(base_rows) + len(pairs)}
                if kind == "steady":
                    res["cache"] = "steady"
                (pfc if kind == "pfc" else base_rows if lib else rows).append(res)
                print(json.dumps({**res, "code": "baseline" if lib else "this"}), flush=True)
        if not keep and i:
            shutil.rmtree(work, ignore_errors=True)
    if not keep and sizes:
        shutil.rmtree(scratch / f"scale_{sizes[0]}", ignore_errors=True)
    return {"lblctl": rows, "partial_fc": pfc, "pairs": pairs, "k": k, "d": d, "batch": 256, "steps": steps,
            "checkpoint_every": checkpoint_every, "steady_steps": steady_steps, "cold_same_rows": cold_same_rows,
            "code": _revision(Path(__file__).resolve().parents[1]),
            **({"baseline": base_rows, "baseline_code": _revision(Path(baseline))} if baseline else {})}


def _revision(folder: Path) -> str:
    """The checkout's commit (with "+changes" when its tracked files differ from it), or "?"."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *a], capture_output=True, text=True).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD")
    return (rev + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")) if rev else "?"


def render_scale(r: dict) -> str:
    lb = {(x["n"], x.get("cache")): x for x in r["lblctl"] if "error" not in x}
    pf = {(x["n"], x.get("rate")): x for x in r["partial_fc"] if "error" not in x}
    ns = sorted({x["n"] for x in r["lblctl"]})
    paired = {(x["for_n"], x["cache"]): x for x in r.get("pairs", []) if "error" not in x}

    def times_10k(n: int, cache: str, key: str = "s_per_step_median") -> str:
        """``n``'s figure ÷ the smallest N's: the run paired with it (right before) where there is one."""
        x, b = lb.get((n, cache), {}), paired.get((n, cache)) or lb.get((ns[0], cache), {})
        return f"{x[key] / b[key]:.2f}" if x.get(key) and b.get(key) else "–"

    def f(v: float | None) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "–"

    md = [f"Code: {r['code']}.", ""] if r.get("code") else []
    md += [f"## train-dp step time vs N (head-only, batch {r['batch']}, D {r['d']}, K {r['k']}, {r['steps']} steps; "
          "median s/step after 3 warm-up steps; × 10k: ÷ a 10k run of the same kind made right before)", "",
          "| N | dtype | lblctl warm | × 10k warm | lblctl cold | × 10k cold | Partial FC 0.1 | Partial FC 1.0 | "
          "PFC 0.1 / lblctl warm |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in ns:
        w, c = lb.get((n, "warm"), {}), lb.get((n, "cold"), {})
        p1, p10 = pf.get((n, 0.1), {}).get("s_per_step_median"), pf.get((n, 1.0), {}).get("s_per_step_median")
        sw = w.get("s_per_step_median")
        sc = c.get("s_per_step_median")
        ratio, ratio_cold = times_10k(n, "warm"), times_10k(n, "cold")
        speed = (f"×{p1 / sw:.1f}" if p1 / sw < 10 else f"×{p1 / sw:.0f}") if p1 and sw else "–"
        md.append(f"| {n:,} | {w.get('dtype', '–')} | {f(sw)} | {ratio} | {f(sc)} | {ratio_cold} | "
                  f"{f(p1)} | {f(p10)} | {speed} |")
    if paired:
        md += ["", "## The smallest N's runs paired with the others (each made right before the run it divides)", "",
               "| for N | run | median s/step | mean s/step | load avg |", "|---:|---|---:|---:|---|"]
        md += [f"| {n:,} | {cache} | {x['s_per_step_median']:.3f} | {x['s_per_step_mean']:.3f} | "
               f"{' '.join(x['loadavg'])} |" for (n, cache), x in sorted(paired.items())]
    if r.get("steady_steps"):
        md += ["", f"## Steady state: warm, {r['steady_steps']} steps, a checkpoint every 100 (train-dp's default)",
               "", "| N | median s/step | × 10k | mean s/step | × 10k | max s/step | flusher total s | "
               "flusher wait s | disk writes per step | MB written per step |",
               "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in ns:
            x = lb.get((n, "steady"), {})
            if not x:
                continue
            rm, ra = times_10k(n, "steady"), times_10k(n, "steady", "s_per_step_mean")
            md.append(f"| {n:,} | {x['s_per_step_median']:.3f} | {rm} | {x['s_per_step_mean']:.3f} | {ra} | "
                      f"{x['s_per_step_max']:.3f} | {x.get('background_write_back_s_total', 0):.2f} | "
                      f"{x.get('flush_wait_s_total', 0):.2f} | {x.get('disk_writes_per_step', 0):.0f} | "
                      f"{x.get('disk_write_mb_per_step', 0):.1f} |")
    if r.get("baseline"):
        old = {(x["n"], x.get("cache")): x for x in r["baseline"] if "error" not in x}
        md += ["", f"## Back to back: this code ({r.get('code', '?')}) and the baseline ({r.get('baseline_code')}), "
               "each run right before or after the other, alternately", "",
               "| N | run | median s/step this | baseline | mean s/step this | baseline | checkpoint s each this | "
               "baseline | flusher total s this | baseline | process CPU s/step this | baseline |",
               "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (n, cache), x in sorted(lb.items()):
            y = old.get((n, cache))
            if y is None:
                continue
            cells = [f"{z.get(key, 0):{fmt}}" for key, fmt in (("s_per_step_median", ".3f"), ("s_per_step_mean", ".3f"),
                                                               ("checkpoint_flush_s_each", ".3f"),
                                                               ("background_write_back_s_total", ".2f"),
                                                               ("process_cpu_s_per_step", ".3f")) for z in (x, y)]
            md.append(f"| {n:,} | {cache} | " + " | ".join(cells) + " |")
    rows_note = ("the first 20k identities' rows, as every run reads them: a cache under this machine may serve "
                 "them" if r.get("cold_same_rows") else "rows drawn anew for the run (20k identities at random of "
                 "N), so no cache under this machine holds them")
    md += ["", "## Cold page cache: the disk's floor (cold runs read " + rows_note + "; reads per step from the "
           "device's counters; the disk's random 4 KB read rate probed on the same store file just before the run, "
           "every read asked for at once as the store's read-ahead does, on pages drawn anew, then on the same "
           "pages again after evicting them here)", "",
           "| N | cold s/step | disk reads per step | MB read per step | disk reads/s (fresh pages) | "
           "floor s/step = reads ÷ rate | cold ÷ floor | reads/s again (a cache under this machine) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in ns:
        c = lb.get((n, "cold"), {})
        if not c.get("disk_read_iops"):
            continue
        floor = c["disk_reads_per_step"] / c["disk_read_iops"]
        ratio = f"{c['s_per_step_median'] / floor:.2f}" if c["disk_reads_per_step"] >= 1 else "–"  # read in warm-up
        again = c.get("disk_read_iops_again")
        md.append(f"| {n:,} | {c['s_per_step_median']:.3f} | {c['disk_reads_per_step']:.0f} | "
                  f"{c['disk_read_mb_per_step']:.1f} | {c['disk_read_iops']:,.0f} | {floor:.3f} | {ratio} | "
                  f"{f'{again:,.0f}' if again else '–'} |")
    md += ["", "## Parts of a step (s/step; store parts run on the store thread, overlapped with compute; "
           "commit = staging and the provisional commit (a cache insert; a spill's undo record and writes count "
           "here too); journal = the queues' undo records and store log records outside a commit; "
           "checkpoint = main thread's time in store.checkpoint and store.flush per checkpoint; "
           "flusher = the background write-back's total)",
           "",
           "| N | cache | step median | step mean | step max | sampler | prefetch | gather | compute (rest) | "
           "commit | "
           "journal | queue update | waiting for store | checkpoint s each | flusher total s | flusher wait s | "
           "main thread CPU s/step | process CPU s/step | anon RSS MiB | store cache rows | spilled rows | load avg |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["lblctl"]:
        if "error" in x:
            md.append(f"| {x['n']:,} | error: {x['error'][:80]} |||||||||||||||")
            continue
        p = x["parts_s_per_step"]
        md.append(f"| {x['n']:,} | {x['cache']} | {x['s_per_step_median']:.3f} | {x['s_per_step_mean']:.3f} | "
                  f"{x.get('s_per_step_max', 0):.3f} | "
                  f"{p['sampler']:.4f} | {p.get('prefetch', 0):.4f} | {p['gather']:.4f} | "
                  f"{x['compute_rest_s_per_step']:.4f} | {p['write_back']:.4f} | {p['journal']:.4f} | "
                  f"{p['queue_update']:.4f} | {x['wait_for_data_s_per_step']:.4f} | "
                  f"{x.get('checkpoint_flush_s_each', 0):.3f} | {x.get('background_write_back_s_total', 0):.2f} | "
                  f"{x.get('flush_wait_s_total', 0):.2f} | {x.get('main_thread_cpu_s_per_step', 0):.4f} | "
                  f"{x.get('process_cpu_s_per_step', 0):.4f} | {x['anon_rss_mib_after']} | "
                  f"{x.get('store_write_cache_rows', '–')} | {x.get('spilled_rows', '–')} | {' '.join(x['loadavg'])} |")
    return "\n".join(md)


# ----------------------------------------------------------------------------- accuracy (seed protocol)


def _cli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "lblctl.cli", *args, "--json", "--quiet", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout)


def _top1(backbone_path: Path, store_dir: Path, probes: list[tuple[str, str]]) -> tuple[float, float]:
    from lblctl.core.store import PrototypeStore
    from lblctl.models.checkpoint import load_backbone
    from lblctl.models.embed import embed_paths
    from lblctl.stages.index import ArraySource, IndexSpec, build_index

    bb = load_backbone(backbone_path)
    emb = embed_paths(bb, [p for _, p in probes], batch_size=128)
    with PrototypeStore.open(store_dir) as s:
        protos = np.concatenate([c for _, c in s.iter_chunks()])
        names = list(s.names)
    index = build_index(ArraySource(protos), IndexSpec(kind="flat"))
    _, ids = index.search(emb.vectors, 5)
    truth = np.array([names.index(n) for n, _ in probes])
    return float((ids[:, 0] == truth).mean()), float((ids == truth[:, None]).any(1).mean())


def run_accuracy(scratch: Path, dp_ids: int, pre_epochs: int, dp_steps: int, k: int, s_: int) -> dict:
    names = sorted(os.listdir(LFW))
    rich = [n for n in names if len(os.listdir(LFW / n)) >= 4]
    rng = np.random.default_rng(0)
    dp_names = sorted(rng.choice(rich, min(dp_ids, len(rich) // 2), replace=False).tolist())
    pre = scratch / "pretrain_faces"
    dp = scratch / "dp_faces"
    probes: list[tuple[str, str]] = []
    for n in names:
        files = sorted(os.listdir(LFW / n))
        if n in dp_names:  # ID photo + 2 training spot photos; one more spot photo held out as the probe
            (dp / n).mkdir(parents=True, exist_ok=True)
            for f in files[:3]:
                os.symlink(LFW / n / f, dp / n / f)
            probes.append((n, str(LFW / n / files[3])))
        else:
            (pre / n).mkdir(parents=True, exist_ok=True)
            for f in files:
                os.symlink(LFW / n / f, pre / n / f)
    t0 = time.perf_counter()
    p = _cli("pretrain", "--data", str(pre), "--out", str(scratch / "run"), "--input-size", "48",
             "--center-crop", "0.6", "--embedding-size", "128", "--epochs", str(pre_epochs), "--batch-size", "128",
             "--warmup-steps", "20", "--workers", "1")
    _cli("imprint", "--data", str(dp), "--backbone", str(scratch / "run"), "--out", str(scratch / "store"),
         "--photos", "id")
    _cli("build-index", "--store", str(scratch / "store"), "--candidates", "50", "--dominant", "20")
    out: dict = {"pretrain_identities": len(os.listdir(pre)), "pretrain_val_accuracy": p.get("val_accuracy"),
                 "dp_identities": len(dp_names), "probes": len(probes), "k": k, "sampled": s_, "steps": dp_steps,
                 "batch": "K classes × 2 photos (ID + spot)"}
    top1, top5 = _top1(scratch / "run", scratch / "store", probes)
    out["imprint_only"] = {"top1": top1, "top5": top5}
    for head in ("dp", "random", "full"):
        args = ["train-dp", "--data", str(dp), "--backbone", str(scratch / "run"), "--store", str(scratch / "store"),
                "--out-store", str(scratch / f"store_{head}"), "--out", str(scratch / f"run_{head}"),
                "--head", head, "--classes", str(k), "--sampled", str(s_), "--steps", str(dp_steps),
                "--lr", "0.01", "--head-lr", "0.5", "--checkpoint-every", "0", "--workers", "1"]
        if head == "full":
            args += ["--batch-size", str(2 * k)]  # the same number of photos per step as dp/random
        r = _cli(*args)
        top1, top5 = _top1(scratch / f"run_{head}", scratch / f"store_{head}", probes)
        out[head] = {"top1": top1, "top5": top5, "final_loss": r.get("final_loss"),
                     "queue_changes": r.get("queue_changes"), "seconds": r.get("seconds")}
    out["seconds_total"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- main


def render(results: dict) -> str:
    """The Markdown tables of whatever parts the results hold."""
    md = []
    if "memory" in results:
        md += ["## Memory vs N (head-only, K classes per step)", "",
               "| N | dtype | s/step | anon RSS MiB (after) | peak RSS MiB | CUDA peak MiB | store bytes |",
               "|---|---|---|---|---|---|---|"]
        for r in results["memory"]:
            if "error" in r:
                md.append(f"| {r['n']:,} | error: {r['error']} | | | | | |")
                continue
            md.append(f"| {r['n']:,} | {r['dtype']} | {r['seconds_per_step']:.3f} | {r['anon_rss_mib_after']} | "
                      f"{r['peak_rss_mib']} | {r['cuda_peak_mib'] or '–'} | {r['store_bytes']:,} |")
    if "overhead" in results:
        o = results["overhead"]
        imgs = [x["images_per_step"] for x in o.get("runs", []) if "images_per_step" in x]
        per = (f"{np.mean(imgs):.0f} images/step of {o['batch_images']} asked (only identities with photos "
               "bring them)") if imgs else f"{o['batch_images']} images/step"
        md += ["", f"## Store-traffic overhead (N = {o['n']:,}, K = {o['k']}, {per}, "
               f"{o['backbone']})", "", "| pipeline | s/step | waiting for data s/step | overhead vs resident |",
               "|---|---|---|---|"]
        for key in ("overlap", "serial"):
            v = o[key]
            rng = v.get("seconds_per_step_range")
            span = f" ({rng[0]:.3f}–{rng[1]:.3f})" if rng else ""
            md.append(f"| {key} | {v['seconds_per_step']:.3f}{span} | {v['wait_for_data_s_per_step']:.4f} | "
                      f"{100 * v['overhead_vs_resident']:.1f} % |")
        if o.get("runs"):
            md += ["", "Runs in order (s/step after the first step; load average before→after):", ""]
            md += [f"- {x['round']} {x['pipeline']}: {x['seconds_per_step_after_first']:.3f} "
                   f"(first step {x['first_step_s']:.2f} s), load {x['loadavg']}" for x in o["runs"]]
    if "accuracy" in results:
        a = results["accuracy"]
        md += ["", f"## Accuracy: closed-set top-1 of held-out spot photos vs all {a['dp_identities']} prototypes",
               "", f"Backbone pretrained on {a['pretrain_identities']} other LFW identities (held-out val accuracy "
               f"{a['pretrain_val_accuracy']}); K = {a['k']}, S = {a['sampled']}, {a['steps']} steps each.", "",
               "| prototypes | top-1 | top-5 |", "|---|---|---|"]
        for key in ("imprint_only", "dp", "random", "full"):
            md.append(f"| {key} | {a[key]['top1']:.3f} | {a[key]['top5']:.3f} |")
    return "\n".join(md)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "memory", "overhead", "accuracy", "scale"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--n", type=int, default=1_000_000, help="identities for the overhead part")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="overhead: rounds of (serial, overlap), order alternating")
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--pfc-path", default=None, help="scale: arcface_torch's partial_fc_v2.py, run beside lblctl")
    ap.add_argument("--pfc-steps", type=int, default=10)
    ap.add_argument("--pfc-max-n", default="1000000,100000", help="scale: largest N for PFC rate 0.1, rate 1.0")
    ap.add_argument("--child-memory", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-scale", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-pfc", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.1, help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cold-same-rows", action="store_true",
                    help="scale: cold runs read the kept features' rows (the first 20k identities, as warm runs "
                         "do), which a cache under this machine may hold from earlier runs; default: rows drawn "
                         "anew for every cold run")
    ap.add_argument("--keep", action="store_true", help="scale: keep the stores in --scratch (and reuse them)")
    ap.add_argument("--name", default="dp_scale", help="scale: results file stem under bench/results/")
    ap.add_argument("--baseline-lib", default=None,
                    help="scale: a checkout of other code (git worktree add ../base REV): every lblctl run again "
                         "with its lblctl, back to back")
    ap.add_argument("--checkpoint-every", type=int, default=10, help="scale: train-dp checkpoints (0: none)")
    ap.add_argument("--steady-steps", type=int, default=0,
                    help="scale: also a long warm run per N (checkpoint every 100) to show the steady state")
    args = ap.parse_args()
    if args.child_memory:
        print(json.dumps(memory_child(args.child_memory, args.d, args.k, args.steps, Path(args.scratch))))
        return
    if args.child_scale:
        print(json.dumps(scale_child(args.child_scale, args.d, args.k, args.steps, Path(args.scratch), args.cold,
                                     args.build, args.checkpoint_every, not args.cold_same_rows)))
        return
    if args.child_pfc:
        print(json.dumps(pfc_child(args.child_pfc, args.d, args.rate, args.steps, args.pfc_path)))
        return
    if args.part == "scale":
        scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dp_scale_", dir=os.environ.get("TMPDIR", "/tmp")))
        top = [int(x) for x in args.pfc_max_n.split(",")]
        try:
            res = run_scale([int(x) for x in args.sizes.split(",")], args.d, args.k, args.steps, scratch,
                            args.pfc_path, args.pfc_steps, {0.1: top[0], 1.0: top[1]}, args.keep,
                            args.checkpoint_every, args.steady_steps, args.baseline_lib, args.cold_same_rows)
        finally:
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
        md = render_scale(res)
        write_results(args.name, res, md)
        print(md)
        return
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dp_bench_", dir=os.environ.get("TMPDIR", "/tmp")))
    previous = {}
    if (RESULTS / "dp_bench.json").exists():
        previous = json.loads((RESULTS / "dp_bench.json").read_text())
    results = {k: previous[k] for k in ("memory", "overhead", "accuracy") if k in previous}
    parts = ["memory", "overhead", "accuracy"] if args.part == "all" else [args.part]
    try:
        if "memory" in parts:
            sizes = [1000, 10000] if args.quick else [int(x) for x in args.sizes.split(",")]
            results["memory"] = run_memory(sizes, args.d, 256 if args.quick else args.k,
                                           5 if args.quick else args.steps, scratch)
        if "overhead" in parts:
            (scratch / "oh").mkdir(exist_ok=True)
            results["overhead"] = run_overhead(10_000 if args.quick else args.n, 5 if args.quick else args.steps,
                                               scratch / "oh", 128 if args.quick else args.k,
                                               32 if args.quick else 128, 1 if args.quick else args.repeats)
        if "accuracy" in parts:
            (scratch / "acc").mkdir(exist_ok=True)
            results["accuracy"] = (run_accuracy(scratch / "acc", 60, 1, 10, 32, 8) if args.quick
                                   else run_accuracy(scratch / "acc", 300, 6, 300, 128, 32))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    md = render(results)
    write_results("dp_bench", {**results, "machine_at_run": machine()}, md)
    print(md)


if __name__ == "__main__":
    main()
