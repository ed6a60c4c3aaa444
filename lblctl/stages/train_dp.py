"""``train-dp``: dominant-prototype softmax over all N identities with only K prototypes on the device.

Each step: choose K classes (:class:`lblctl.train.dp.DominantSampler`), load their prototypes and
momentum into the K×D head (:class:`lblctl.train.dp_head.DPHead`, which applies its own SGD), train
one step of a margin softmax over K on photos of those classes (the engine,
:class:`lblctl.train.engine.Trainer`), write the K updated rows back, and promote the hardest wrong
class of every sample in its class's dominant queue.

Overlap: :class:`lblctl.train.streamer.StoreStreamer` owns all store I/O, in one background thread,
in order. While step t computes, it writes back step t−1 and gathers (and decodes the photos of)
step t+1; rows of step t+1 that step t also trains are then patched with step t's fresh values, so
no update is lost.

Resume: a step's store commit is provisional (in the store's write-back cache; no disk traffic per
step); at a checkpoint the store writes one commit point for all of them (:meth:`PrototypeStore.checkpoint`),
the run saves its own checkpoint, and only then do the rows go to the store's data file. A killed run
reopens the store at its own checkpoint (``recover_to``). Queue promotions reach their file only at
checkpoints, with an undo record of each changed queue (:class:`lblctl.train.dp.UndoJournal`). A run
killed at any moment is rolled back to its checkpoint and continues with the same selections, photos
and RNG streams.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lblctl.core import dist as dist_env
from lblctl.core import ui
from lblctl.core.artifacts import MANIFEST, describe_input, write_manifest
from lblctl.core.errors import IncompatibleArtifact, LblError
from lblctl.core.queues import Queues
from lblctl.core.shards import ShardLayout, check_world, read_layout, shard_dir
from lblctl.core.store import DEFAULT_WRITE_CACHE_ROWS, PrototypeStore
from lblctl.core.summary import Summary
from lblctl.data.faces import open_face_set
from lblctl.models.checkpoint import FILENAME, load_backbone, save_backbone
from lblctl.models.losses import build_loss, resolve_loss_options
from lblctl.train.dp import DominantSampler, UndoJournal, hardest_wrong
from lblctl.train.dp_data import FeatureSource, ImageSource
from lblctl.train.dp_dist import ShardedDPHead, Shards, shard_names
from lblctl.train.dp_head import DPHead
from lblctl.train.engine import (
    CHECKPOINT_DIR,
    LOG_FILE,
    StepResult,
    TrainConfig,
    Trainer,
    checkpoint_step,
    latest_checkpoint,
)
from lblctl.train.streamer import StepData, StoreStreamer

HEADS = ("dp", "random", "full")
HEAD_LR_PER_IMAGE = 0.5 / 256  # the default prototype lr: 0.5 at K = 128 classes × 2 photos per step
INDEX_MANIFEST = "index_manifest.json"  # build-index's manifest beside the store's (lblctl.stages.index)
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
    # Share of the K − S non-sampled slots filled from the dominant queues (the rest: random rows). 1.0 (every slot
    # a hard negative) collapses retrieval over all N as training goes on: the queue members are pushed away
    # from the data while the rows no queue holds stay put and win (README "Does train-dp pay off?").
    hard_fraction: float = 0.5
    photos_per_class: int = 2
    batch_size: int = 0  # images per step; 0 = K × photos_per_class
    loss: str = "cosface"
    loss_kwargs: dict[str, float | None] = field(default_factory=dict)  # s, m; missing/None: the loss's defaults
    # None = HEAD_LR_PER_IMAGE × images per step. Each prototype sees only its 2–3 photos and a 1/batch share
    # of the mean loss's gradient, so at the backbone's 0.01 it barely leaves its imprint, and a fixed rate
    # is too large for small batches (bench/accuracy_bench.py, README "Does train-dp pay off?").
    head_lr: float | None = None
    freeze_backbone: bool = False
    # Fine-tuning only: True keeps the backbone's BatchNorm running statistics (BN layers in eval mode). Off by
    # default: measured, updating them costs little on the backbone's own domain (LFW) and gains a lot when the
    # ID/spot photos differ from the pretraining photos (ORL after Yale B) (README "Does train-dp pay off?").
    freeze_bn: bool = False
    # Fine-tuning only: the first fraction of the steps trains the prototypes alone (backbone frozen), so the
    # backbone is not pulled towards prototypes that are still bare ID-photo imprints.
    head_warmup: float = 0.0
    projection: bool = False  # head-only mode: also learn a linear projection of the features
    epochs: int | None = None
    workers: int = 1
    resume: bool = False
    flip_augment: bool = True
    overlap: bool = True  # False: gather after the previous write-back (the serial reference)
    # The store's write-back cache (rows). None: the rows a checkpoint interval can touch (K × --checkpoint-every,
    # at least the store's default 65,536, at most the store's rows and 1/8 of the free memory), so that the
    # provisional rows of an interval stay in memory and never go to the data file before their checkpoint.
    store_cache_rows: int | None = None
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
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise LblError(f"--hard-fraction {self.hard_fraction}: a share of the K − S slots, 0 ≤ f ≤ 1")
        if not 0.0 <= self.head_warmup < 1.0:
            raise LblError(f"--head-warmup {self.head_warmup}: a fraction of the steps, 0 ≤ f < 1")
        if self.train.optimizer != "sgd":
            raise LblError("train-dp: --optimizer sgd only (each class keeps its SGD momentum in the store)")


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
    for name in ("prototypes.h5", "queues.h5", "index.faiss", "manifest.json", "duplicates.csv", INDEX_MANIFEST):
        if (src / name).exists():
            shutil.copy2(src / name, dst / f".{name}.copy")
    for name in ("prototypes.h5", "queues.h5", "index.faiss", "duplicates.csv", INDEX_MANIFEST, "manifest.json"):
        if (dst / f".{name}.copy").exists():
            (dst / f".{name}.copy").rename(dst / name)  # manifest last: a torn copy never opens
    return dst


def finished_run(cfg: TrainDPConfig) -> dict[str, Any] | None:
    """A run that already finished in ``--out``: with ``--resume`` and the same length, its summary
    (nothing to do); otherwise how to train further. Never touches the store, whose prototypes now
    belong with ``OUT/backbone.pt`` (re-imprinting would throw that training away)."""
    out = Path(cfg.out)
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        params = manifest["params"]
        if "head" not in params or "summary" not in manifest:
            return None  # not a train-dp run's manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None
    steps = manifest["summary"].get("steps")
    same = params.get("epochs") == cfg.epochs and (cfg.epochs is not None or
                                                   params.get("train", {}).get("steps") == cfg.train.steps)
    if cfg.resume and same:
        ui.info(f"--out {out}: this train-dp run already finished ({steps} steps); nothing to resume")
        return {**manifest["summary"], "already_complete": True}
    again = f"--backbone {out}" if (out / FILENAME).exists() else "--features …"
    raise LblError(f"--out {out}: holds a finished train-dp run ({steps} steps); to train further, start a new "
                   f"run from it: {again} --store {cfg.out_store or cfg.store} --out NEW_FOLDER (without --resume)")


def train_dp(cfg: TrainDPConfig, device: torch.device, env: dist_env.DistEnv | None = None) -> dict[str, Any]:
    """Train; under torchrun (``env.active``) each rank trains its own shard of a sharded store."""
    env = env or dist_env.DistEnv()
    done = finished_run(cfg)
    if done is not None:
        return done
    cfg.validate()
    layout = _check_sharding(cfg, env)
    out = Path(cfg.out)
    ckpt_dir = out / CHECKPOINT_DIR
    journal_path = ckpt_dir / (f"undo.rank{env.rank}.bin" if env.active else JOURNAL)
    if (latest_checkpoint(out) is not None or journal_path.exists()) and not cfg.resume:
        raise LblError(f"--out {out}: holds an earlier train-dp run; add --resume to continue it or choose a new --out")
    backbone = load_backbone(cfg.backbone, device) if cfg.backbone is not None else None
    if backbone is not None and cfg.out_store is not None and not (Path(cfg.out_store) / "prototypes.h5").exists():
        try:  # a store of another size or backbone is refused before --out-store copies it
            PrototypeStore.open(cfg.store, "r", expect_embedding_size=backbone.embedding_size,
                                expect_backbone_fingerprint=backbone.fingerprint, cache="mmap", populate=False).close()
        except IncompatibleArtifact as exc:
            raise IncompatibleArtifact(_trained_store_advice(Path(cfg.store), str(exc))) from None
    shards, names = None, None
    if env.active:
        assert layout is not None
        shards = Shards(env, layout, device)
        names = shard_names(Path(cfg.store), layout)  # every row's name, read before any shard is written
        shards.barrier()
        store_dir = shard_dir(cfg.store, env.rank, env.world_size)  # the only shard this rank opens to write
    elif layout is not None:
        store_dir = shard_dir(cfg.store, 0, 1)  # sharded for one process: its one shard is a plain store
    else:
        store_dir = _prepare_store(cfg)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    try:
        store = PrototypeStore.open(
            store_dir, "r+",
            expect_embedding_size=backbone.embedding_size if backbone else None,
            expect_backbone_fingerprint=backbone.fingerprint if backbone else None,
            write_cache_rows=cfg.store_cache_rows,
            recover_to=checkpoint_step(ckpt) if ckpt is not None else None,  # a kill may have left it one ahead
        )
    except IncompatibleArtifact as exc:
        raise IncompatibleArtifact(_trained_store_advice(store_dir, str(exc))) from None
    dim, n = store.embedding_size, store.num_rows
    queues = None
    try:
        if cfg.store_cache_rows is None:  # what a checkpoint interval touches: this rank's share of K a step
            interval = cfg.train.checkpoint_every or max(1, cfg.train.steps)
            store.size_write_cache(max(DEFAULT_WRITE_CACHE_ROWS, -(-cfg.classes // env.world_size) * interval))
        if cfg.head == "dp":
            queues = Queues.open(store_dir, "r+", expect_rows=n)
        if shards is not None:
            n = shards.layout.num_rows
        return _run(cfg, device, out, store_dir, store, queues, backbone, dim, n, journal_path, shards, names)
    finally:
        if queues is not None:
            queues.close()
        store.close()


def _check_sharding(cfg: TrainDPConfig, env: dist_env.DistEnv) -> ShardLayout | None:
    """The store's shard layout (None: a plain store); refuse a store that does not fit this job."""
    layout = read_layout(cfg.store)
    check_world(cfg.store, layout, env.world_size)
    if layout is None:
        return None
    if cfg.out_store is not None:
        raise LblError(f"--out-store: --store {cfg.store} is sharded (each rank trains its own shard in place); "
                       "copy the store folder and train the copy")
    return layout


def _run(cfg: TrainDPConfig, device: torch.device, out: Path, store_dir: Path, store: PrototypeStore,
         queues: Queues | None, backbone, dim: int, n: int, journal_path: Path, shards: Shards | None = None,
         names=None) -> dict[str, Any]:  # noqa: ANN001 - names: the global rows' StringArray (sharded runs)
    env = shards.env if shards is not None else dist_env.DistEnv()
    source, model = _source_and_model(cfg, store, backbone, dim, device, names)
    sampler = DominantSampler(n, source.trainable, cfg.classes, cfg.sampled, cfg.train.seed, mode=cfg.head,
                              hard_fraction=cfg.hard_fraction)
    _warn_clamped(cfg, sampler, n)
    k, per_class, tcfg = sampler.classes, cfg.photos_per_class, cfg.train
    if cfg.batch_size > 0:
        batch_classes = max(1, min(k, cfg.batch_size // per_class))
    else:  # every chosen class brings photos; the full softmax only its sampled ones
        batch_classes = sampler.sampled if cfg.head == "full" else k
    if cfg.epochs is not None:
        tcfg.steps = cfg.epochs * sampler.steps_per_epoch
    train_backbone = not cfg.freeze_backbone and (cfg.data is not None or cfg.projection)
    loss_options = resolve_loss_options(cfg.loss, cfg.loss_kwargs)
    head_lr = cfg.head_lr or HEAD_LR_PER_IMAGE * batch_classes * per_class
    if shards is None:
        head = DPHead(k, dim, build_loss(cfg.loss, **loss_options), lr=head_lr,
                      momentum=tcfg.momentum, device=device)
    else:  # this rank's slice of the K classes; the softmax is normalised across ranks
        head = ShardedDPHead(k, dim, build_loss(cfg.loss, **loss_options), head_lr, tcfg.momentum, device, shards)
    modules: dict[str, nn.Module] = {"backbone": model} if train_backbone else {}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}] if train_backbone else []
    trainer = Trainer(tcfg, device, modules, groups, out, extra_optimizers=[head.optimizer], env=env)
    forward = model
    if not train_backbone:
        model.eval()
    elif shards is not None:
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    warm_steps = int(cfg.head_warmup * tcfg.steps) if train_backbone else 0
    frozen_bn = _batch_norms(model) if train_backbone and cfg.freeze_bn else []
    if not store.has_momentum:
        ui.warn(f"{store_dir}: the store keeps no momentum, so prototypes restart SGD momentum whenever they "
                "are sampled (imprint with momentum to keep it, as Partial FC does)")
    journal = UndoJournal(journal_path, store.num_rows)  # sharded: this rank's rows only
    next_rows = _resume(cfg, trainer, store, queues, journal, journal_path, store_dir)

    def photos(step: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if shards is not None:  # every rank chooses the global batch, then loads its equal slice of it
            rows = shards.plans[step].rows
        items, labels = source.choose(rows[:batch_classes], per_class, np.random.default_rng([tcfg.seed, 2, step]))
        if shards is not None:
            lo, hi = shards.batch_slice(len(items))
            items, labels = items[lo:hi], labels[lo:hi]
        return source.load(items, labels)

    dominant_of = queues.dominant if queues is not None else None
    if shards is not None and queues is not None:
        dominant_of = shards.dominant_of(queues.dominant, queues.dq)

    def select(step: int) -> np.ndarray:
        rows = sampler.select(step, dominant_of)
        if shards is None:
            return rows
        return shards.local_rows(shards.plan(step, rows))  # the rows of this rank's shard, head-slice order

    def global_rows(step: int, rows: np.ndarray) -> np.ndarray:
        return rows if shards is None else shards.plans[step].rows

    def ahead(step: int) -> np.ndarray:  # read-ahead hint without collectives: this rank's own seeds of the step
        assert shards is not None
        seeds = sampler.seeds(step)
        return shards.layout.local(seeds[shards.layout.owner(seeds) == env.rank])

    streamer = StoreStreamer(store, select, photos, overlap=cfg.overlap, pin=device.type == "cuda",
                             ahead=ahead if shards is not None else None)
    touched = np.zeros(store.num_rows, dtype=bool)
    stats = {"queue_changes": 0}
    now: dict[str, Any] = {}

    # ------------------------------------------------------------------ the loop, driven by the engine
    def batches(epoch: int, start: int):
        for _ in range(start, sampler.steps_per_epoch):
            data = streamer.next()
            nxt = global_rows(data.step + 1, streamer.next_rows)
            trainer.extra_state["next_rows"] = torch.from_numpy(nxt)  # weights_only-loadable
            yield data

    def backbone_mode() -> bool:
        """Whether this step trains the backbone (not during --head-warmup); BatchNorm kept in eval mode
        where --freeze-bn (or the warm-up) says so, each step, since the engine sets train mode per epoch."""
        backbone_steps = train_backbone and trainer.step >= warm_steps
        if warm_steps and trainer.step == warm_steps:
            model.train()  # the warm-up is over
        for m in (model.modules() if train_backbone and not backbone_steps else frozen_bn):
            m.eval()
        return backbone_steps

    def compute(data: StepData) -> StepResult | None:
        if shards is not None:
            return compute_sharded(data)
        head.load(data.vectors, data.momentum)
        now.clear()
        now["data"] = data
        if len(data.labels) < 2:
            return None
        x, y = data.inputs.to(device, non_blocking=True), data.labels.to(device)
        if cfg.flip_augment and x.dim() == 4:
            flip = (torch.rand(len(x), generator=trainer.aug) < 0.5).to(device)
            x[flip] = x[flip].flip(-1)
        with torch.set_grad_enabled(backbone_mode()), trainer.autocast():
            emb = model(x)
        res = head(emb, y)
        now.update(cosine=res.cosine, labels=y)
        return StepResult(res.loss, len(y), {"train_accuracy": float((res.cosine.argmax(1) == y).float().mean())})

    def compute_sharded(data: StepData) -> StepResult | None:
        assert shards is not None
        head.load_slice(shards.plans[data.step], data.vectors, data.momentum)
        now.clear()
        now["data"] = data
        sizes = shards.sizes(len(data.labels))  # every rank joins every step, or none does
        if sum(sizes) < 2:
            return None
        x, y = data.inputs.to(device, non_blocking=True), data.labels.to(device)
        if cfg.flip_augment and x.dim() == 4:  # drawn for the global batch: W ranks flip what 1 rank would
            first = sum(sizes[: env.rank])
            flip = (torch.rand(sum(sizes), generator=trainer.aug) < 0.5)[first:first + len(x)].to(device)
            x[flip] = x[flip].flip(-1)
        with torch.set_grad_enabled(backbone_mode()), trainer.autocast():
            emb = forward(x)
        res = head.step_forward(emb, y, sizes)
        now.update(sharded=res)
        return StepResult(res.loss, len(y), {"train_accuracy": float(res.accuracy)})

    def promote_sharded() -> None:
        """The owner of each sample's class row applies its promotion (global batch order)."""
        assert shards is not None and queues is not None
        res, plan = now["sharded"], shards.plans[now["data"].step]
        cls_rows = plan.rows[res.labels.cpu().numpy()]
        conf_rows = plan.rows[res.hardest.cpu().numpy()]
        mine = shards.layout.owner(cls_rows) == env.rank
        local = shards.layout.local(cls_rows[mine])
        new = journal.first_touch("queu", local)
        if len(new):
            journal.record("queu", new, queues.dominant(new).astype(np.int32))
        stats["queue_changes"] += queues.promote(local, conf_rows[mine], class_ids=cls_rows[mine], id_rows=n)

    def on_step_end(step: int) -> None:
        data = now["data"]
        vec, mom = head.rows()
        streamer.write_back(data, vec, mom, commit_as=step)
        touched[data.rows] = True
        if queues is not None and shards is not None:
            promote_sharded()
        elif queues is not None:  # every sample's hardest wrong class joins its class's dominant queue
            cls_rows = data.rows[now["labels"].cpu().numpy()]
            conf_rows = data.rows[hardest_wrong(now["cosine"], now["labels"]).cpu().numpy()]
            new = journal.first_touch("queu", cls_rows)
            if len(new):  # the queues' values at the checkpoint, saved before their first change
                journal.record("queu", new, queues.dominant(new).astype(np.int32))
            stats["queue_changes"] += queues.promote(cls_rows, conf_rows)

    def before_checkpoint() -> None:
        streamer.drain()
        store.checkpoint()  # the steps' provisional commits: one commit point in the store's log, durable
        if queues is not None:
            queues.flush()

    def after_checkpoint(step: int) -> None:
        journal.reset(step)
        store.flush(wait=False)  # our checkpoint is durable: the store's rows go to its file in the background

    trainer.before_checkpoint, trainer.after_checkpoint = before_checkpoint, after_checkpoint
    if trainer.step == 0:
        next_rows = select(0)
        trainer.extra_state["next_rows"] = torch.from_numpy(global_rows(0, next_rows))
        trainer.save_checkpoint()  # step 0: the state a run killed before its first checkpoint returns to
    elif shards is not None:  # the checkpoint keeps the global rows of its next step
        next_rows = shards.local_rows(shards.plan(trainer.step, next_rows))
    try:
        streamer.start(trainer.step, next_rows)
        result = trainer.fit(batches, compute, steps_per_epoch=sampler.steps_per_epoch, on_step_end=on_step_end,
                             description=f"train-dp ({cfg.head})")
        streamer.drain()
    finally:
        streamer.close()
        journal.close()
        source.close()
    summary = {
        "out": str(out), "store": str(store_dir), "head": cfg.head, "classes": k, "sampled": sampler.sampled,
        "hard_fraction": cfg.hard_fraction if cfg.head == "dp" else None,
        "batch_classes": batch_classes, "freeze_bn": bool(frozen_bn), "head_warmup_steps": warm_steps,
        "loss": {"name": cfg.loss, **loss_options}, "head_lr": head_lr,
        "identities": n,
        "trainable_identities": int(len(source.trainable)),
        **result, "store_rows_touched": int(touched.sum()), "queue_changes": stats["queue_changes"],
        "wait_for_data_s": streamer.wait_s, "store_write_cache_rows": store.write_cache_rows,
        "store_flushes": int(store.stats["flushes"]),
        "store_spilled_rows": int(store.stats["spilled_rows"]),  # written before their checkpoint (cache full)
        "problems": source.problems.summary(), "device": str(device),
    }
    if shards is not None:  # the job's totals; the store and the summary rows are per shard
        summary.update(store_rows_touched=int(shards.total(summary["store_rows_touched"])),
                       queue_changes=int(shards.total(summary["queue_changes"])), processes=env.world_size,
                       store=str(cfg.store))
        return _finish_sharded(cfg, out, store, backbone, model, dim, trainer, summary, shards)
    return _finish(cfg, out, store_dir, store, backbone, model, dim, trainer, summary)


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers whose running statistics ``freeze_bn`` keeps (put in eval mode every step)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _finish_sharded(cfg: TrainDPConfig, out: Path, store: PrototypeStore, backbone, model: nn.Module, dim: int,
                    trainer: Trainer, summary: dict[str, Any], shards: Shards) -> dict[str, Any]:
    """Rank 0 saves the backbone and the manifest; every rank hands its own shard to the backbone."""
    shards.barrier()  # every shard is written: the run's outputs may be described
    if not shards.env.is_main:
        fingerprint = shards.broadcast(None)
        if fingerprint is not None:
            store.set_backbone_fingerprint(fingerprint)
        return {"rank": shards.env.rank, **summary}
    fingerprint = _save_backbone(cfg, out, backbone, model, dim, trainer)
    shards.broadcast(fingerprint)
    if fingerprint is not None:
        store.set_backbone_fingerprint(fingerprint)
    summary["backbone_fingerprint"] = fingerprint
    _write_run_manifest(cfg, out, Path(cfg.store), dim, fingerprint, summary)
    return summary


def _source_and_model(cfg: TrainDPConfig, store: PrototypeStore, backbone, dim: int,
                      device: torch.device, names=None) -> tuple[ImageSource | FeatureSource, nn.Module]:  # noqa: ANN001
    """Photos and the network that embeds them: the backbone, or (head-only) an identity projection.
    ``names``: every row's identity (a sharded run's global rows); default the store's."""
    names = store.names if names is None else names
    if cfg.data is not None:
        assert backbone is not None
        source: ImageSource | FeatureSource = ImageSource(open_face_set(cfg.data), names,
                                                          backbone.preprocess, cfg.workers)
        model: nn.Module = backbone.model
    else:
        source = FeatureSource(cfg.features, names, dim)
        model = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(model.weight)
        model = model.to(device)
    if len(source.trainable) == 0:
        raise LblError("no store identity has photos in --data/--features (names must match the store's)")
    return source, model


def _resume(cfg: TrainDPConfig, trainer: Trainer, store: PrototypeStore, queues: Queues | None,
            journal: UndoJournal, journal_path: Path, store_dir: Path) -> np.ndarray | None:
    """Roll the store and queues back to the newest checkpoint; the rows of its next step (or None)."""
    out = trainer.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINT_DIR).mkdir(exist_ok=True)
    loaded = cfg.resume and latest_checkpoint(out) is not None
    if not (cfg.resume and (loaded or journal_path.exists())):
        return None
    step = trainer.resume() if loaded else 0
    jstep, records = UndoJournal.read(journal_path) if journal_path.exists() else (-1, [])
    if jstep == step:
        _roll_back(store, queues, records, step)
    if step and store.committed_step != step:
        raise IncompatibleArtifact(
            f"{store_dir}: store is at step {store.committed_step}, the checkpoint at {step}; "
            "the store was changed outside this run")
    if not loaded:
        return None
    ui.info(f"resuming train-dp from step {step}")
    journal.reset(step)  # the store and queues are exactly at the checkpoint again: journal from here
    return trainer.extra_state["next_rows"].numpy().astype(np.int64)


def _save_backbone(cfg: TrainDPConfig, out: Path, backbone, model: nn.Module, dim: int,  # noqa: ANN001
                   trainer: Trainer) -> str | None:
    """``OUT/backbone.pt`` when the run trained on photos; its fingerprint (None: head-only)."""
    if cfg.data is None:
        return None
    assert backbone is not None
    return save_backbone(out / FILENAME, model, arch=backbone.arch, embedding_size=dim,
                         preprocess=backbone.preprocess, arch_kwargs=backbone.meta["arch_kwargs"],
                         extra={"train_dp_steps": trainer.step, "from": backbone.fingerprint})


def _finish(cfg: TrainDPConfig, out: Path, store_dir: Path, store: PrototypeStore, backbone, model: nn.Module,
            dim: int, trainer: Trainer, summary: dict[str, Any]) -> dict[str, Any]:
    """Save the fine-tuned backbone (with images), hand the store to it, write the manifest."""
    fingerprint = _save_backbone(cfg, out, backbone, model, dim, trainer)
    if fingerprint is not None:
        store.set_backbone_fingerprint(fingerprint)  # the store now belongs with OUT/backbone.pt
    summary["backbone_fingerprint"] = fingerprint
    _write_run_manifest(cfg, out, store_dir, dim, fingerprint, summary)
    return summary


def _write_run_manifest(cfg: TrainDPConfig, out: Path, store_dir: Path, dim: int, fingerprint: str | None,
                        summary: dict[str, Any]) -> None:
    files = [LOG_FILE]
    if cfg.data is not None:
        files.insert(0, FILENAME)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        files.append(f"{CHECKPOINT_DIR}/{ckpt.name}")
    params = {k_: v for k_, v in asdict(cfg).items() if k_ not in ("train",)}
    params["train"] = {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in asdict(cfg.train).items()}
    inputs = {"store": describe_input(store_dir)}
    if cfg.data is not None:
        inputs.update(data=describe_input(cfg.data), backbone=describe_input(Path(cfg.backbone)))
    else:
        inputs["features"] = describe_input(cfg.features)
    write_manifest(out, "backbone" if cfg.data is not None else "train-dp", params=params, inputs=inputs,
                   files=files, embedding_size=dim, backbone_fingerprint=fingerprint,
                   extra={"summary": summary})  # the whole summary: --resume on a finished run reports it


def _trained_store_advice(store_dir: Path, message: str) -> str:
    """A store that train-dp already trained belongs with that run's backbone: say so instead of the
    generic "re-imprint" (which would throw its training away)."""
    if "another backbone" not in message:
        return message
    try:
        with PrototypeStore.open(store_dir, "r") as st:
            trained = st.committed_step > 0
    except (LblError, OSError):
        return message
    if not trained:
        return message
    return (f"--store {store_dir}: was trained by an earlier train-dp run and now belongs with that run's "
            "backbone; to train further give --backbone RUN2 (that run's --out), not the backbone it started "
            "from (re-imprinting would throw the training away)")


def _warn_clamped(cfg: TrainDPConfig, sampler: DominantSampler, n: int) -> None:
    """Say so when K or S had to shrink to fit the store (the summary holds the values used)."""
    if cfg.head != "full" and (sampler.classes, sampler.sampled) != (cfg.classes, cfg.sampled):
        ui.warn(f"--classes {cfg.classes} / --sampled {cfg.sampled}: the store holds {n} identities "
                f"({len(sampler.trainable)} with photos); using --classes {sampler.classes} "
                f"--sampled {sampler.sampled}")


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


def run(cfg: TrainDPConfig, device: torch.device | str = "auto") -> Summary:
    """The train-dp stage (see :func:`train_dp`). Under ``torchrun`` every rank trains its shard of a
    store sharded for the job's world size; rank 0 alone prints and writes the run's files."""
    env, device = dist_env.join(device)  # under torchrun: cuda:LOCAL_RANK, the process group joined
    return Summary("train-dp", train_dp(cfg, device, env))
