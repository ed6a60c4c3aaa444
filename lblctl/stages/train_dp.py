"""``train-dp``: dominant-prototype softmax over all N identities with only K prototypes on the device.

Each step (see :class:`lblctl.train.dp.DominantSampler`): choose K classes, gather their prototypes
(and per-class momentum) from the store into a fixed K×D head parameter, train one step of a
margin softmax over K on photos of those classes, write the K updated rows back, and promote the
hardest wrong class of every sample in its class's dominant queue.

Overlap: one background thread owns all store I/O, in order. While step t computes, it writes
back step t−1 and gathers (and decodes the photos of) step t+1; rows of step t+1 that step t
also trains are then patched with step t's fresh values, so no update is lost.

Resume: every store commit is preceded by an undo record of the rows' values at the last
checkpoint (:class:`lblctl.train.dp.UndoJournal`); queue promotions reach their file only at
checkpoints. A run killed at any moment is rolled back to its checkpoint and continues with the
same selections, photos and RNG streams.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lblctl.core import ui
from lblctl.core.artifacts import describe_input, write_manifest
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.queues import Queues
from lblctl.core.store import PrototypeStore
from lblctl.data.faces import open_face_set
from lblctl.models.checkpoint import FILENAME, load_backbone, save_backbone
from lblctl.models.losses import build_loss
from lblctl.train.dp import DominantSampler, UndoJournal, hardest_wrong
from lblctl.train.dp_data import FeatureSource, ImageSource
from lblctl.train.engine import CHECKPOINT_DIR, LOG_FILE, StepResult, TrainConfig, Trainer, latest_checkpoint

HEADS = ("dp", "random", "full")
HEAD_LR_PER_IMAGE = 0.5 / 256  # the default prototype lr: 0.5 at K = 128 classes × 2 photos per step
JOURNAL = "undo.bin"


@dataclass
class TrainDPConfig:
    store: Path
    out: Path
    data: Path | None = None
    features: Path | None = None
    backbone: Path | None = None
    out_store: Path | None = None
    head: str = "dp"  # dp | random (Partial-FC-style) | full (all N on the device)
    classes: int = 256  # K
    sampled: int = 64  # S
    photos_per_class: int = 2
    batch_size: int = 0  # images per step; 0 = K × photos_per_class
    loss: str = "cosface"
    loss_kwargs: dict[str, float] = field(default_factory=lambda: {"s": 24.0, "m": 0.2})
    # None = HEAD_LR_PER_IMAGE × images per step. Each prototype sees only its 2–3 photos and a 1/batch share
    # of the mean loss's gradient, so at the backbone's 0.01 it barely leaves its imprint, and a fixed rate
    # is too large for small batches (bench/accuracy_bench.py, README "Does train-dp pay off?").
    head_lr: float | None = None
    freeze_backbone: bool = False
    projection: bool = False  # head-only mode: also learn a linear projection of the features
    epochs: int | None = None
    workers: int = 1
    resume: bool = False
    flip_augment: bool = True
    overlap: bool = True  # False: gather after the previous write-back (the serial reference)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1, lr=0.01, weight_decay=5e-4))

    def validate(self) -> None:
        if (self.data is None) == (self.features is None):
            raise LblError("give exactly one of --data IDS (with --backbone) or --features FEATS.h5")
        if self.data is not None and self.backbone is None:
            raise LblError("--data needs --backbone RUN/backbone.pt (or use --features for head-only training)")
        if self.head not in HEADS:
            raise LblError(f"--head {self.head}: choose dp, random or full")
        if self.classes < 2 or self.sampled < 1 or self.sampled > self.classes:
            raise LblError(f"--classes {self.classes} / --sampled {self.sampled}: need 1 ≤ S ≤ K and K ≥ 2")
        if self.photos_per_class < 1:
            raise LblError(f"--photos-per-class {self.photos_per_class}: need at least 1")
        if self.train.optimizer != "sgd":
            raise LblError("train-dp: --optimizer sgd only (each class keeps its SGD momentum in the store)")


@dataclass
class Prepared:
    """Everything step ``step`` needs, made by the background thread."""

    step: int
    rows: np.ndarray
    vectors: np.ndarray
    momentum: np.ndarray | None
    inputs: torch.Tensor
    labels: torch.Tensor


def _as_stored(v: np.ndarray, dtype: str, normalise: bool) -> np.ndarray:
    """What the store returns after writing ``v``: renormalised in float32, cast to its dtype."""
    v = np.asarray(v, dtype=np.float32)
    if normalise:
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float16 if dtype == "float16" else np.float32).astype(np.float32)


def _prepare_store(cfg: TrainDPConfig) -> Path:
    """Train in place, or in a copy at ``--out-store`` (made once; a resumed run reuses it)."""
    src = Path(cfg.store)
    if cfg.out_store is None:
        return src
    dst = Path(cfg.out_store)
    if (dst / "prototypes.h5").exists():
        if not cfg.resume:
            raise LblError(f"--out-store {dst}: already holds a store; add --resume or choose a new folder")
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("prototypes.h5", "queues.h5", "index.faiss", "manifest.json", "duplicates.csv"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / f".{name}.copy")
    for name in ("prototypes.h5", "queues.h5", "index.faiss", "duplicates.csv", "manifest.json"):
        if (dst / f".{name}.copy").exists():
            (dst / f".{name}.copy").rename(dst / name)  # manifest last: a torn copy never opens
    return dst


def train_dp(cfg: TrainDPConfig, device: torch.device) -> dict[str, Any]:
    cfg.validate()
    out = Path(cfg.out)
    ckpt_dir = out / CHECKPOINT_DIR
    journal_path = ckpt_dir / JOURNAL
    if (latest_checkpoint(out) is not None or journal_path.exists()) and not cfg.resume:
        raise LblError(f"--out {out}: holds an earlier train-dp run; add --resume to continue it or choose a new --out")
    store_dir = _prepare_store(cfg)

    backbone = load_backbone(cfg.backbone, device) if cfg.backbone is not None else None
    store = PrototypeStore.open(
        store_dir, "r+",
        expect_embedding_size=backbone.embedding_size if backbone else None,
        expect_backbone_fingerprint=backbone.fingerprint if backbone else None,
    )
    dim, n = store.embedding_size, store.num_rows
    queues = None
    if cfg.head == "dp":
        queues = Queues.open(store_dir, "r+", expect_rows=n)
    try:
        return _run(cfg, device, out, store_dir, store, queues, backbone, dim, n, journal_path)
    finally:
        if queues is not None:
            queues.close()
        store.close()


def _run(cfg: TrainDPConfig, device: torch.device, out: Path, store_dir: Path, store: PrototypeStore,
         queues: Queues | None, backbone, dim: int, n: int, journal_path: Path) -> dict[str, Any]:
    if cfg.data is not None:
        assert backbone is not None
        source: ImageSource | FeatureSource = ImageSource(open_face_set(cfg.data), store.names,
                                                          backbone.preprocess, cfg.workers)
        model: nn.Module = backbone.model
    else:
        source = FeatureSource(cfg.features, store.names, dim)
        model = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(model.weight)
        model = model.to(device)
    if len(source.trainable) == 0:
        raise LblError("no store identity has photos in --data/--features (names must match the store's)")
    sampler = DominantSampler(n, source.trainable, cfg.classes, cfg.sampled, cfg.train.seed, mode=cfg.head)
    k = sampler.classes
    per_class = cfg.photos_per_class
    if cfg.batch_size > 0:
        batch_classes = max(1, min(k, cfg.batch_size // per_class))
    else:  # every chosen class brings photos; the full softmax only its sampled ones
        batch_classes = sampler.sampled if cfg.head == "full" else k
    tcfg = cfg.train
    if cfg.epochs is not None:
        tcfg.steps = cfg.epochs * sampler.steps_per_epoch

    train_backbone = not cfg.freeze_backbone and (cfg.data is not None or cfg.projection)
    head = nn.Module()
    head.weight = nn.Parameter(torch.zeros(k, dim, device=device))
    modules: dict[str, nn.Module] = {"head": head}
    groups: list[dict[str, Any]] = [{"params": [head.weight], "weight_decay": 0.0,
                                     "lr": cfg.head_lr or HEAD_LR_PER_IMAGE * batch_classes * per_class}]
    if train_backbone:
        modules["backbone"] = model
        groups.insert(0, {"params": [p for p in model.parameters() if p.requires_grad]})
    trainer = Trainer(tcfg, device, modules, groups, out)
    loss_fn = build_loss(cfg.loss, **cfg.loss_kwargs)
    has_mom = store.has_momentum
    if not has_mom:
        ui.warn(f"{store_dir}: the store keeps no momentum, so prototypes restart SGD momentum whenever they "
                "are sampled (imprint with momentum to keep it, as Partial FC does)")

    # ------------------------------------------------------------------ resume / roll back
    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINT_DIR).mkdir(exist_ok=True)
    journal = UndoJournal(journal_path, n)
    next_rows: np.ndarray | None = None
    loaded = cfg.resume and latest_checkpoint(out) is not None
    if cfg.resume and (loaded or journal_path.exists()):
        step = trainer.resume() if loaded else 0
        jstep, records = UndoJournal.read(journal_path) if journal_path.exists() else (-1, [])
        if jstep == step:
            _roll_back(store, queues, records, step)
        if step and store.committed_step != step:
            raise IncompatibleArtifact(
                f"{store_dir}: store is at step {store.committed_step}, the checkpoint at {step}; "
                "the store was changed outside this run")
        if loaded:
            next_rows = trainer.extra_state["next_rows"].numpy().astype(np.int64)
            ui.info(f"resuming train-dp from step {step}")
        if loaded:  # the store and queues are exactly at the checkpoint again: journal from here
            journal.reset(step)
    touched = np.zeros(n, dtype=bool)
    stats: dict[str, Any] = {"queue_changes": 0, "wait_s": 0.0}

    executor = ThreadPoolExecutor(1, thread_name_prefix="lblctl-store")
    pending: list[Future] = []
    fresh: dict[str, Any] = {}

    def prepare(step: int, rows: np.ndarray) -> Prepared:
        vec = store.gather(rows)
        mom = store.gather_momentum(rows) if has_mom else None
        rng = np.random.default_rng([tcfg.seed, 2, step])
        items, labels = source.choose(rows[:batch_classes], per_class, rng)
        x, y = source.load(items, labels)
        return Prepared(step, rows, vec, mom, x, y)

    def writeback(step: int, rows: np.ndarray, vec: np.ndarray, mom: np.ndarray | None) -> None:
        new = journal.first_touch("prot", rows)
        if len(new):
            journal.record("prot", new, store.gather(new))
            if has_mom:
                journal.record("mome", new, store.gather_momentum(new))
        store.scatter(rows, vec, momentum=mom, normalised=True)  # the exact bits the next step was patched with
        store.commit(step)

    def drain() -> None:
        executor.submit(lambda: None).result()
        for f in pending:
            f.result()  # re-raise a writer error here, in the main thread
        pending.clear()

    def select(step: int) -> np.ndarray:
        return sampler.select(step, queues.dominant if queues is not None else None)

    def stream():
        s = trainer.step
        rows_cur = next_rows if next_rows is not None else select(s)
        fut_cur = executor.submit(prepare, s, rows_cur)
        rows_nxt = select(s + 1)
        fut_nxt = executor.submit(prepare, s + 1, rows_nxt) if cfg.overlap else None
        while True:
            t0 = time.perf_counter()
            data = fut_cur.result()
            stats["wait_s"] += time.perf_counter() - t0  # store traffic + decoding not hidden behind compute
            if fresh and fresh["step"] == s - 1 and cfg.overlap:
                _patch(data, fresh)
            trainer.extra_state["next_rows"] = torch.from_numpy(rows_nxt)  # weights_only-loadable
            yield data
            s += 1
            if not cfg.overlap:  # serial: step s gathers only after step s-1 is written back
                drain()
                fut_nxt = executor.submit(prepare, s, rows_nxt)
            rows_cur, fut_cur = rows_nxt, fut_nxt
            rows_nxt = select(s + 1)
            if cfg.overlap:
                fut_nxt = executor.submit(prepare, s + 1, rows_nxt)

    def _patch(data: Prepared, f: dict[str, Any]) -> None:
        _, i, j = np.intersect1d(data.rows, f["rows"], assume_unique=True, return_indices=True)
        if len(i):
            data.vectors[i] = f["vectors"][j]
            if data.momentum is not None and f["momentum"] is not None:
                data.momentum[i] = f["momentum"][j]

    the_stream = stream()

    def batches_for_epoch(epoch: int, start: int):
        for _ in range(sampler.steps_per_epoch - start):
            yield next(the_stream)

    current: dict[str, Any] = {}

    def compute(batch: Prepared) -> StepResult | None:
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(batch.vectors))
        state = trainer.optimizer.state[head.weight]
        if batch.momentum is not None:
            state["momentum_buffer"] = torch.from_numpy(batch.momentum).to(device)
        else:
            state.pop("momentum_buffer", None)
        current.clear()
        current.update(step=batch.step, rows=batch.rows)
        if len(batch.labels) < 2:
            current["skip"] = True
            return None
        x = batch.inputs.to(device, non_blocking=True)
        y = batch.labels.to(device)
        if cfg.flip_augment and x.dim() == 4:
            flip = (torch.rand(len(x), generator=trainer.aug) < 0.5).to(device)
            x[flip] = x[flip].flip(-1)
        if train_backbone:
            with trainer.autocast():
                emb = model(x)
        else:
            model.eval()
            with torch.no_grad(), trainer.autocast():
                emb = model(x)
        res = loss_fn(emb.float(), head.weight, y)
        current.update(cosine=res.cosine, labels=y)
        return StepResult(res.loss, len(y), {"train_accuracy": float((res.cosine.argmax(1) == y).float().mean())})

    def on_step_end(step: int) -> None:
        rows = current["rows"]
        vec = head.weight.detach().float().cpu().numpy().copy()
        buf = trainer.optimizer.state[head.weight].get("momentum_buffer")
        mom = buf.detach().float().cpu().numpy().copy() if (has_mom and buf is not None) else None
        if has_mom and mom is None:
            mom = np.zeros_like(vec)
        vec = _as_stored(vec, store.dtype, True)
        mom = _as_stored(mom, store.dtype, False) if mom is not None else None
        pending.append(executor.submit(writeback, step, rows, vec, mom))
        fresh.clear()
        fresh.update(step=current["step"], rows=rows, vectors=vec, momentum=mom)
        touched[rows] = True
        if queues is not None and "cosine" in current:
            labels = current["labels"]
            wrong = hardest_wrong(current["cosine"], labels).cpu().numpy()
            lab = labels.cpu().numpy()
            cls_rows, conf_rows = rows[lab], rows[wrong]
            new = journal.first_touch("queu", cls_rows)
            if len(new):
                journal.record("queu", new, queues.dominant(new).astype(np.int32))
            stats["queue_changes"] += queues.promote(cls_rows, conf_rows)
        if len(pending) > 4:
            done = [f for f in pending if f.done()]
            for f in done:
                f.result()
                pending.remove(f)

    def before_checkpoint() -> None:
        drain()
        if queues is not None:
            queues.flush()

    trainer.before_checkpoint = before_checkpoint
    trainer.after_checkpoint = journal.reset
    if trainer.step == 0:
        next_rows = select(0)
        trainer.extra_state["next_rows"] = torch.from_numpy(next_rows)
        trainer.save_checkpoint()  # step 0: the state a run killed before its first checkpoint returns to

    try:
        result = trainer.fit(batches_for_epoch, compute, steps_per_epoch=sampler.steps_per_epoch,
                             on_step_end=on_step_end, description=f"train-dp ({cfg.head})")
        drain()
    finally:
        executor.shutdown(wait=True)
        journal.close()
        source.close()

    fingerprint = None
    files = [LOG_FILE]
    if cfg.data is not None:
        assert backbone is not None
        fingerprint = save_backbone(out / FILENAME, model, arch=backbone.arch, embedding_size=dim,
                                    preprocess=backbone.preprocess, arch_kwargs=backbone.meta["arch_kwargs"],
                                    extra={"train_dp_steps": trainer.step, "from": backbone.fingerprint})
        files.insert(0, FILENAME)
        store.set_backbone_fingerprint(fingerprint)  # the store now belongs with OUT/backbone.pt
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        files.append(f"{CHECKPOINT_DIR}/{ckpt.name}")
    summary = {
        "out": str(out), "store": str(store_dir), "head": cfg.head, "classes": k, "sampled": sampler.sampled,
        "batch_classes": batch_classes, "head_lr": groups[-1]["lr"], "identities": n,
        "trainable_identities": int(len(source.trainable)),
        **result, "store_rows_touched": int(touched.sum()), "queue_changes": stats["queue_changes"],
        "wait_for_data_s": stats["wait_s"],
        "backbone_fingerprint": fingerprint, "problems": source.problems.summary(), "device": str(device),
    }
    params = {k_: v for k_, v in asdict(cfg).items() if k_ not in ("train",)}
    params["train"] = {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in asdict(tcfg).items()}
    inputs = {"store": describe_input(store_dir)}
    if cfg.data is not None:
        inputs.update(data=describe_input(cfg.data), backbone=describe_input(Path(cfg.backbone)))
    else:
        inputs["features"] = describe_input(cfg.features)
    write_manifest(out, "backbone" if cfg.data is not None else "train-dp", params=params, inputs=inputs,
                   files=files, embedding_size=dim, backbone_fingerprint=fingerprint,
                   extra={"summary": {x: summary[x] for x in ("steps", "final_loss", "store_rows_touched",
                                                              "queue_changes")}})
    return summary


def _roll_back(store: PrototypeStore, queues: Queues | None, records, step: int) -> None:
    """Put every row changed since checkpoint ``step`` back to its value at that checkpoint."""
    rows = [r for t, r, _ in records if t == "prot"]
    if rows:
        all_rows = np.concatenate(rows)
        old = np.concatenate([v for t, _, v in records if t == "prot"])
        moms = [v for t, _, v in records if t == "mome"]
        store.scatter(all_rows, old, momentum=np.concatenate(moms) if moms and store.has_momentum else None,
                      normalised=True)
        store.commit(step)  # no records: nothing was written after the checkpoint
    qrec = [(r, v) for t, r, v in records if t == "queu"]
    if qrec and queues is not None:
        queues.restore(np.concatenate([r for r, _ in qrec]), np.concatenate([v for _, v in qrec]))
