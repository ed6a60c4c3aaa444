"""``imprint``: fill a prototype store with one unit vector per identity.

Each chosen photo of an identity is embedded (unit length), the identity's embeddings are averaged
and the mean is renormalised: the imprinting rule of the seed. Photos stream through one
DataLoader in identity order, so memory does not grow with N: finished identities go to a
memory-mapped staging file ``STORE/.imprint/``, unreadable photos to a record log there
(:mod:`lblctl.core.journal`), and a small state file, replaced atomically after the rows are
synced, records how far it got, which is where ``--resume`` continues. At the end the identities
that had a readable photo are copied into ``prototypes.h5``; the others are listed in
``left_out.csv`` (never a zero row).

Under ``torchrun`` (or ``--nproc N``) the store is written sharded (:mod:`lblctl.core.shards`): rank R
embeds the identities ``R, R+W, R+2W …`` into its own staging folder ``STORE/.imprint/rank-R-of-W/``
(resumable per rank), the ranks all-gather which identities got a row, and each writes its own shard
``STORE/shard-R-of-W/`` (one writer per shard). When no identity is left out, the rows a rank owns are
the ones it embedded; otherwise the rows move to their owners chunk by chunk (a summed all-reduce of
zero-padded chunks: memory one chunk). After a barrier rank 0 writes ``left_out.csv``, ``problems.csv``
and, last, ``shards.json``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lblctl.core import dist as dist_env
from lblctl.core import ui
from lblctl.core.artifacts import MANIFEST, atomic_open, atomic_write_json, describe_input
from lblctl.core.errors import LblError
from lblctl.core.journal import RecordLog, read_log
from lblctl.core.shards import ShardLayout, is_sharded, shard_dir, write_layout
from lblctl.core.store import DTYPES, FILENAME, PrototypeStore
from lblctl.core.strings import StringArrayBuilder
from lblctl.core.summary import Summary
from lblctl.data.faces import FaceDataset, FaceIndex, ProblemLog, make_loader, open_face_set
from lblctl.data.features import FeaturesFile
from lblctl.models.checkpoint import Backbone, open_backbone
from lblctl.train.engine import DeferredInterrupt, Interrupted, fetch

STAGING = ".imprint"
STATE = "state.json"
PROBLEMS_LOG = "problems.log"
_PROBLEM = 1  # record: path, NUL, reason (utf-8)
PHOTO_KINDS = ("id", "spot", "all")
_COPY_ROWS = 65536


@dataclass
class ImprintConfig:
    out: Path
    data: Path | None = None
    backbone: Path | None = None
    features: Path | None = None
    photos: str = "id"
    flip: bool = False
    batch_size: int = 64
    workers: int = 0
    dtype: str = "float32"
    momentum: bool = True  # keep per-row SGD momentum beside the prototypes for train-dp (Partial FC does)
    resume: bool = False
    checkpoint_identities: int = 4096


def _staging_dir(out: Path, env: dist_env.DistEnv) -> Path:
    """One process: ``OUT/.imprint``; under torchrun each rank's own ``OUT/.imprint/rank-R-of-W``."""
    return out / STAGING / f"rank-{env.rank:05d}-of-{env.world_size:05d}" if env.active else out / STAGING


def _staged_world(out: Path) -> int | None:
    """The process count of an interrupted imprint in ``out`` (None: there is none)."""
    if (out / STAGING / STATE).exists():
        return 1
    worlds = {int(p.name.rsplit("-of-", 1)[1]) for p in (out / STAGING).glob("rank-*-of-*") if (p / STATE).exists()}
    return max(worlds) if worlds else None


def _check_out(cfg: ImprintConfig, env: dist_env.DistEnv | None = None) -> None:
    out = Path(cfg.out)
    env = env or dist_env.DistEnv()
    if ((out / FILENAME).exists() and (out / MANIFEST).exists()) or is_sharded(out):
        raise LblError(f"--out {out}: already holds a finished store; choose a new --out or remove it")
    staged = _staged_world(out)
    if staged is not None and not cfg.resume:
        raise LblError(f"--out {out}: holds an interrupted imprint; add --resume to continue it "
                       "or choose a new --out")
    if staged is not None and staged != env.world_size:
        raise LblError(f"--resume: {out} was started by {staged} process(es), this job has {env.world_size}; "
                       f"resume it with {'--nproc ' + str(staged) if staged > 1 else 'one process'} "
                       "or choose a new --out")


def imprint(cfg: ImprintConfig, device: torch.device | str = "cpu",
            on_checkpoint: Callable[[int], None] | None = None,
            env: dist_env.DistEnv | None = None) -> dict[str, Any]:
    """Imprint a store from photos (``cfg.data`` + ``cfg.backbone``) or from ``cfg.features``.

    ``env`` (under torchrun): this rank embeds its share of the identities and writes its shard."""
    env = env or dist_env.DistEnv()
    if cfg.dtype not in DTYPES:
        raise LblError(f"--dtype {cfg.dtype}: expected float32 or float16")
    if cfg.features is not None:
        if cfg.data is not None:
            raise LblError("give --data (photos) or --features (precomputed embeddings), not both")
        if env.active:
            raise LblError("imprint --features runs in one process; run it without torchrun, then "
                           f"`lblctl reshard --store {cfg.out} --world {env.world_size} --out NEW_STORE`")
        return imprint_features(cfg, device)
    if cfg.data is None or cfg.backbone is None:
        raise LblError("imprint needs --data and --backbone (or --features FEATS.h5)")
    if cfg.photos not in PHOTO_KINDS:
        raise LblError(f"--photos {cfg.photos}: expected id, spot or all")
    if cfg.batch_size < 1:
        raise LblError(f"--batch-size {cfg.batch_size}: must be at least 1")
    _check_out(cfg, env)
    if env.active:  # every rank has looked at OUT before any writes its staging into it
        import torch.distributed as dist

        dist.barrier()
    backbone = open_backbone(cfg.backbone, device)  # an lblctl backbone or an ONNX recognition model
    index = open_face_set(cfg.data)
    return _imprint_photos(cfg, backbone, index, on_checkpoint, env)


# ---------------------------------------------------------------------- from photos


class _Staging:
    """``STORE/.imprint/``: unit rows of finished identities (memory-mapped), their status, the state."""

    def __init__(self, folder: Path, n: int, dim: int, dtype: np.dtype, signature: dict[str, Any],
                 resume: bool) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        state_path = folder / STATE
        self.done = 0
        if resume and state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("signature") != signature:
                diff = [k for k in signature if state.get("signature", {}).get(k) != signature[k]]
                raise LblError(f"--resume: {folder.parent} was started with other inputs or options "
                               f"({', '.join(diff)} differ); use the same ones or a new --out")
            self.done = int(state["done"])
        else:
            for p in folder.iterdir():
                p.unlink()
        self.signature = signature
        mode = "r+" if self.done else "w+"
        self.vectors = np.memmap(folder / "vectors.bin", dtype=dtype, mode=mode, shape=(max(n, 1), dim))
        # status per identity: 0 not yet, 1 imprinted, 2 no photo of the chosen kind, 3 no readable photo
        self.status = np.memmap(folder / "status.bin", dtype=np.uint8, mode=mode, shape=(max(n, 1),))
        self.problems_path = folder / PROBLEMS_LOG
        self._problems = RecordLog(self.problems_path, b"imprint", keep_records=False)

    def checkpoint(self, done: int) -> None:
        """Sync the rows (and the problems) first, then move the state: a resume never trusts a row
        that had not reached the disk."""
        for mm in (self.vectors, self.status):
            mm.flush()  # msync: the rows are on disk before the state says they are done
        self._problems.sync()
        atomic_write_json(self.folder / STATE, {"signature": self.signature, "done": int(done)})
        self.done = done

    def add_problems(self, problems) -> None:
        for p in problems:
            self._problems.append(_PROBLEM, f"{p.path}\0{p.reason}".encode())

    def read_problems(self) -> ProblemLog:
        log = ProblemLog()
        seen: set[tuple[str, str]] = set()
        for _, payload in read_log(self.problems_path, b"imprint"):
            path, _, reason = bytes(payload).decode("utf-8").partition("\0")
            if (path, reason) not in seen:  # a resumed stretch may repeat a few
                seen.add((path, reason))
                log.add(path, reason)
        return log

    def close(self) -> None:
        self._problems.close()


def _imprint_photos(cfg: ImprintConfig, backbone: Backbone, index: FaceIndex,
                    on_checkpoint: Callable[[int], None] | None,
                    env: dist_env.DistEnv | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    env = env or dist_env.DistEnv()
    out = Path(cfg.out)
    n_all, dim = index.num_identities, backbone.embedding_size
    world, rank = env.world_size, env.rank
    ids = np.arange(rank, n_all, world, dtype=np.int64)  # the identities this process embeds (all in one)
    n = len(ids)  # below, identities are numbered 0..n-1 within this process's share
    signature = {"backbone": backbone.fingerprint, "data": describe_input(cfg.data).get("fingerprint") or
                 str(Path(cfg.data).resolve()), "identities": n_all, "images": int(index.num_images),
                 "photos": cfg.photos, "flip": bool(cfg.flip), "dtype": cfg.dtype}
    if env.active:
        signature.update(world_size=world, rank=rank)
    stage = _Staging(_staging_dir(out, env), n, dim, DTYPES[cfg.dtype], signature, cfg.resume)
    start = stage.done
    if start:
        ui.info(f"resuming: {start} of {n} identities already imprinted")
    # each image's identity as this process numbers it (other ranks' images are never read)
    image_identity = index.image_identity if world == 1 else (index.image_identity - rank) // world
    rows = index.select_images(cfg.photos, ids[start:]) if start < n else np.zeros(0, dtype=np.int64)
    dataset = FaceDataset(index, rows, image_identity[rows], backbone.preprocess)
    loader = make_loader(dataset, batch_size=cfg.batch_size, workers=cfg.workers if len(rows) else 0)

    sums: dict[int, np.ndarray] = {}
    pending_unreadable: set[int] = set()
    done = start
    embedded = 0

    def finish_upto(upto: int) -> None:
        nonlocal done
        if upto <= done:
            return
        ids = np.arange(done, upto)
        status = np.full(len(ids), 2, dtype=np.uint8)
        status[np.isin(ids, list(pending_unreadable))] = 3
        got = [i for i in range(done, upto) if i in sums]
        if got:
            mat = np.stack([sums.pop(i) for i in got])
            mat /= np.linalg.norm(mat, axis=1, keepdims=True)
            stage.vectors[got] = mat.astype(stage.vectors.dtype)
            status[np.asarray(got) - done] = 1
        stage.status[done:upto] = status
        pending_unreadable.difference_update(range(done, upto))
        done = upto

    last_checkpoint = start
    def save_interrupted() -> None:
        stage.checkpoint(done)
        raise Interrupted(f"{done - start} more identities ({done} of {n}) in {Path(cfg.out) / STAGING}")

    with ui.progress("imgs/s") as bar, DeferredInterrupt() as stop:
        task = bar.add_task("imprint", total=n - start, **{"imgs/s": "-"})
        t_loop = time.perf_counter()
        for b, batch in enumerate(fetch(loader, stop, save_interrupted)):
            stage.add_problems(batch.problems)
            lo, hi = b * cfg.batch_size, min(len(rows), (b + 1) * cfg.batch_size)
            if batch.problems:  # a bad photo's identity: the rows of this batch that did not come back
                bad_rows = set(rows[lo:hi].tolist()) - set(batch.rows.tolist())
                pending_unreadable.update(int(image_identity[r]) for r in bad_rows)
            if len(batch):
                emb = backbone.embed(batch.images, flip=cfg.flip).numpy().astype(np.float64)
                for ident, e in zip(batch.labels.tolist(), emb, strict=True):
                    acc = sums.get(ident)
                    if acc is None:
                        sums[ident] = e.copy()
                    else:
                        acc += e
                embedded += len(batch)
            # every identity before the next unread photo's identity is complete
            upto = int(image_identity[rows[hi]]) if hi < len(rows) else n
            before = done
            finish_upto(upto)
            rate = embedded / max(1e-9, time.perf_counter() - t_loop)
            bar.update(task, advance=done - before, **{"imgs/s": f"{rate:.0f}"})
            if done - last_checkpoint >= cfg.checkpoint_identities:
                stage.checkpoint(done)
                last_checkpoint = done
                if on_checkpoint is not None:
                    on_checkpoint(done)
            if stop.requested is not None:  # between batches: every identity below ``done`` is whole
                save_interrupted()
        finish_upto(n)
        bar.update(task, completed=n - start)
    stage.checkpoint(n)
    seconds_embed = time.perf_counter() - t0
    if env.active:
        summary, embedded = _finalise_sharded(cfg, index, stage, backbone, dim, env, ids, embedded)
    else:
        summary = _finalise(cfg, index, stage, backbone, n, dim)
    summary.update({"resumed_from": start, "images_embedded": embedded,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "images_per_second": round(embedded / max(1e-9, seconds_embed), 2)})
    return summary


def _finalise(cfg: ImprintConfig, index: FaceIndex, stage: _Staging, backbone: Backbone, n: int,
              dim: int) -> dict[str, Any]:
    """Copy the imprinted identities into ``prototypes.h5``; list the others; write the manifest."""
    out = Path(cfg.out)
    status = np.asarray(stage.status[:n])
    good = np.flatnonzero(status == 1)
    if len(good) == 0:
        raise LblError(f"--data {cfg.data}: no identity has a readable {cfg.photos} photo; "
                       "nothing to imprint "
                       f"(see {out / STAGING / 'problems.csv'})")
    names, photos = StringArrayBuilder(), StringArrayBuilder()
    for i in good:
        names.append(index.names[int(i)])
        ids = index.images_of(int(i), "id")
        photos.append(os.path.abspath(index.path(int(ids[0]))) if len(ids) else "")
    left = np.flatnonzero(status != 1)
    reasons = {2: f"no {cfg.photos} photo", 3: f"no readable {cfg.photos} photo", 0: "not processed"}
    with atomic_open(out / "left_out.csv", "w") as fh:
        w = csv.writer(fh)
        w.writerow(["identity", "reason"])
        for i in left:
            w.writerow([index.names[int(i)], reasons[int(status[i])]])
    problems = stage.read_problems()
    stage.close()
    problems.write_csv(out / "problems.csv")
    params = {"photos": cfg.photos, "flip": cfg.flip, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
              "arch": backbone.arch, "preprocess": backbone.preprocess.as_dict()}
    inputs = {"data": describe_input(cfg.data), "backbone": describe_input(backbone.path)}
    with PrototypeStore.create(out, dim, names.build(), cfg.dtype, backbone.fingerprint,
                               id_photos=photos.build(), momentum=cfg.momentum,
                               params=params, inputs=inputs, cache="mmap", overwrite=True) as store:
        for a in range(0, len(good), _COPY_ROWS):
            sel = good[a:a + _COPY_ROWS]
            store.fill(a, np.asarray(stage.vectors[sel], dtype=np.float32))
    shutil.rmtree(out / STAGING)
    return {"store": str(out), "identities": n, "imprinted": int(len(good)), "left_out": int(len(left)),
            "left_out_examples": [index.names[int(i)] for i in left[:10]], "problems": problems.summary(5),
            "embedding_size": dim, "dtype": cfg.dtype, "backbone_fingerprint": backbone.fingerprint}


def _comm_device() -> torch.device:
    """Where collective tensors live: this process's GPU under NCCL, else the CPU (gloo)."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _finalise_sharded(cfg: ImprintConfig, index: FaceIndex, stage: _Staging, backbone: Backbone, dim: int,
                      env: dist_env.DistEnv, ids: np.ndarray, embedded: int) -> tuple[dict[str, Any], int]:
    """Every rank writes its shard of the imprinted identities; rank 0 the reports and, last, ``shards.json``.

    Returns the summary and the images embedded by all ranks."""
    import torch.distributed as dist

    out, world, rank = Path(cfg.out), env.world_size, env.rank
    n_all = index.num_identities
    dev = _comm_device()
    per = -(-n_all // world)
    mine = torch.zeros(per, dtype=torch.uint8)
    mine[:len(ids)] = torch.from_numpy(np.asarray(stage.status[:len(ids)], dtype=np.uint8))
    parts = [torch.zeros(per, dtype=torch.uint8, device=dev) for _ in range(world)]
    dist.all_gather(parts, mine.to(dev))
    status = torch.stack(parts).cpu().numpy().T.reshape(-1)[:n_all]  # identity i: rank i % W, position i // W
    count = torch.tensor([embedded], dtype=torch.int64, device=dev)
    dist.all_reduce(count)
    good = np.flatnonzero(status == 1)
    if len(good) == 0:
        raise LblError(f"--data {cfg.data}: no identity has a readable {cfg.photos} photo; nothing to imprint "
                       f"(see the problems logs in {out / STAGING})")
    layout = ShardLayout(world, len(good), dim)
    rows = layout.rows_of(rank)
    names, photos = StringArrayBuilder(), StringArrayBuilder()
    for i in good[rows]:
        names.append(index.names[int(i)])
        id_images = index.images_of(int(i), "id")
        photos.append(os.path.abspath(index.path(int(id_images[0]))) if len(id_images) else "")
    params = {"photos": cfg.photos, "flip": cfg.flip, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
              "arch": backbone.arch, "preprocess": backbone.preprocess.as_dict(), "world_size": world, "rank": rank}
    inputs = {"data": describe_input(cfg.data), "backbone": describe_input(backbone.path)}
    with PrototypeStore.create(shard_dir(out, rank, world), dim, names.build(), cfg.dtype, backbone.fingerprint,
                               id_photos=photos.build(), momentum=cfg.momentum, params=params, inputs=inputs,
                               cache="mmap", overwrite=True) as store:
        if len(good) == n_all:  # nothing left out: the rows this rank owns are the ones it embedded, in order
            for a in range(0, len(rows), _COPY_ROWS):
                store.fill(a, np.asarray(stage.vectors[a:a + _COPY_ROWS], dtype=np.float32))
        else:  # rows moved by the left-out identities: each chunk of global rows is summed from its embedders
            chunk = max(world, _COPY_ROWS // world * world)
            for a in range(0, len(good), chunk):
                idents = good[a:a + chunk]
                buf = np.zeros((len(idents), dim), dtype=np.float32)
                here = idents % world == rank
                buf[here] = stage.vectors[idents[here] // world]
                t = torch.from_numpy(buf).to(dev)
                dist.all_reduce(t)  # one non-zero term per row: the sum is that row, bit for bit
                owned = (np.arange(a, a + len(idents)) % world) == rank
                if owned.any():
                    store.fill(a // world, t.cpu().numpy()[owned])
    stage.close()
    dist.barrier()  # every shard is whole
    left = np.flatnonzero(status != 1)
    reasons = {2: f"no {cfg.photos} photo", 3: f"no readable {cfg.photos} photo", 0: "not processed"}
    problems = ProblemLog()
    if env.is_main:
        with atomic_open(out / "left_out.csv", "w") as fh:
            w = csv.writer(fh)
            w.writerow(["identity", "reason"])
            for i in left:
                w.writerow([index.names[int(i)], reasons[int(status[i])]])
        seen: set[tuple[str, str]] = set()
        for r in range(world):  # the ranks' problem logs (OUT is on a filesystem every rank writes)
            log = _staging_dir(out, dist_env.DistEnv(r, world, 0)) / PROBLEMS_LOG
            for _, payload in read_log(log, b"imprint"):
                path, _, reason = bytes(payload).decode("utf-8").partition("\0")
                if (path, reason) not in seen:
                    seen.add((path, reason))
                    problems.add(path, reason)
        problems.write_csv(out / "problems.csv")
        write_layout(out, layout)  # the commit point: a folder without it is not a store
        shutil.rmtree(out / STAGING)
    dist.barrier()
    summary = {"store": str(out), "identities": n_all, "imprinted": int(len(good)), "left_out": int(len(left)),
               "left_out_examples": [index.names[int(i)] for i in left[:10]], "problems": problems.summary(5),
               "embedding_size": dim, "dtype": cfg.dtype, "backbone_fingerprint": backbone.fingerprint,
               "world_size": world, "shard_rows": int(len(rows))}
    if not env.is_main:
        summary = {"rank": rank, "shard": str(shard_dir(out, rank, world)), "shard_rows": int(len(rows))}
    return summary, int(count.item())


# ---------------------------------------------------------------------- from features


def imprint_features(cfg: ImprintConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A store from ``features`` M×D + ``identities`` M (rows of one identity are averaged)."""
    t0 = time.perf_counter()
    out, path = Path(cfg.out), Path(cfg.features)  # type: ignore[arg-type]
    _check_out(cfg)
    with FeaturesFile(path) as f:
        feats, m, dim = f.features, f.num_rows, f.dim
        fp = None
        if cfg.backbone is not None:
            bb = open_backbone(cfg.backbone, "cpu")
            if bb.embedding_size != dim:
                raise LblError(f"--features {path}: {dim}-d features but --backbone {cfg.backbone} makes "
                               f"{bb.embedding_size}-d embeddings")
            fp = bb.fingerprint
        elif f.backbone_fingerprint:
            fp = f.backbone_fingerprint
        chunk = max(1, min(_COPY_ROWS, (64 << 20) // max(1, dim * 4)))
        # pass 1: the identity of every row, by name (identities in order of first appearance)
        idents, group = f.identities()
        n = len(idents)
        # pass 2: sum unit features per identity in a memory-mapped staging file
        staging = out / STAGING
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        sums = np.memmap(staging / "sums.bin", dtype=np.float32, mode="w+", shape=(max(n, 1), dim))
        counts = np.zeros(n, dtype=np.int64)
        problems = ProblemLog()
        with ui.progress() as bar:
            task = bar.add_task("features", total=m)
            for a in range(0, m, chunk):
                x = np.asarray(feats[a:a + chunk], dtype=np.float64)
                g = group[a:a + len(x)]
                norms = np.linalg.norm(x, axis=1)
                ok = np.isfinite(norms) & (norms > 1e-12)
                for r in np.flatnonzero(~ok):
                    problems.add(f"{path}:features[{a + r}]", "zero or non-finite feature row")
                if ok.any():  # per-identity sums of this chunk (sort + reduceat), then one scattered add
                    gk = g[ok]
                    order = np.argsort(gk, kind="stable")
                    gs = gk[order]
                    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
                    part = np.add.reduceat((x[ok] / norms[ok, None])[order], starts, axis=0)
                    sums[gs[starts]] += part.astype(np.float32)
                counts += np.bincount(g[ok], minlength=n)
                bar.advance(task, len(x))
        good = np.flatnonzero(counts > 0)
        if len(good) == 0:
            raise LblError(f"--features {path}: no usable feature rows")
        names = StringArrayBuilder()
        for i in good:
            names.append(idents[int(i)])
        left = [idents[int(i)] for i in np.flatnonzero(counts == 0)]
    with atomic_open(out / "left_out.csv", "w") as fh:
        w = csv.writer(fh)
        w.writerow(["identity", "reason"])
        for name in left:
            w.writerow([name, "no usable feature row"])
    problems.write_csv(out / "problems.csv")
    params = {"dtype": cfg.dtype, "source": "features"}
    inputs = {"features": describe_input(path)}
    if cfg.backbone is not None:
        inputs["backbone"] = describe_input(cfg.backbone)
    with PrototypeStore.create(out, dim, names.build(), cfg.dtype, fp, params=params, inputs=inputs,
                               momentum=cfg.momentum, cache="mmap", overwrite=True) as store:
        for a in range(0, len(good), _COPY_ROWS):
            sel = good[a:a + _COPY_ROWS]
            store.fill(a, np.asarray(sums[sel]))
    del sums
    shutil.rmtree(staging)
    return {"store": str(out), "feature_rows": int(m), "identities": int(n), "imprinted": int(len(good)),
            "left_out": len(left), "problems": problems.summary(5), "embedding_size": int(dim),
            "dtype": cfg.dtype, "backbone_fingerprint": fp, "seconds": round(time.perf_counter() - t0, 3)}


def run(cfg: ImprintConfig, device: torch.device | str = "auto") -> Summary:
    """The imprint stage: a prototype store from photos (with a backbone) or from a features file; under
    torchrun a sharded store, each rank embedding and writing its own shard."""
    env, device = dist_env.join(device)  # under torchrun: cuda:LOCAL_RANK, the process group joined
    return Summary("imprint", imprint(cfg, device, env=env))
