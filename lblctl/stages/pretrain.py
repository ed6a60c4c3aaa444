"""``pretrain``: train a backbone with a margin-softmax head (or centre / pair / triplet loss).

Identities are split: most train the classifier, a held-out set (≥ 2 photos each) measures
verification accuracy at the end of every epoch, so the figure is on people never seen.
Triplet, contrastive and pair losses draw P identities × K photos per batch (:class:`PKBatchSampler`);
with ``pk_id_spot`` the K photos are the identity's ID photo + K − 1 spot photos, which with
``--loss triplet|contrastive --mining batchhard`` is the verification stage (V) of the CVC recipe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lblctl.core import dist as dist_env
from lblctl.core import ui
from lblctl.core.artifacts import describe_input, write_manifest
from lblctl.core.errors import LblError
from lblctl.core.metrics import kfold_accuracy
from lblctl.core.summary import Summary
from lblctl.data.faces import (
    EpochBatchSampler,
    FaceDataset,
    FaceIndex,
    Preprocess,
    ProblemLog,
    make_loader,
    open_face_set,
    split_identities,
)
from lblctl.models.backbones import create_backbone, default_input_size
from lblctl.models.checkpoint import FILENAME, Backbone, save_backbone
from lblctl.models.embed import embed_paths
from lblctl.models.init import apply_init, manifest_arch_kwargs
from lblctl.models.losses import MARGIN_HEADS, METRIC_LOSSES, NEEDS_PK, Objective, resolve_loss_options
from lblctl.models.partial_fc import ShardedObjective
from lblctl.train.engine import CHECKPOINT_DIR, LOG_FILE, StepResult, TrainConfig, Trainer, latest_checkpoint
from lblctl.train.samplers import PKBatchSampler, RankSlice


@dataclass
class PretrainConfig:
    data: Path
    out: Path
    arch: str = "small_cnn"
    embedding_size: int = 512
    input_size: int | None = None
    center_crop: float = 1.0
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str = "cosface"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # s, m, m1…; unset = the loss's defaults
    batch_size: int = 0  # 0 = 128, or P·K with pk_identities × pk_images
    pk_identities: int = 0  # P×K batches (needed by triplet and pair): P identities …
    pk_images: int = 0  # … × K photos each; the batch size is then P·K
    pk_id_spot: bool = False  # each identity's K photos: its ID photo + K − 1 spot photos (CVC's V stage)
    epochs: int | None = None
    val_fraction: float = 0.1
    val_max_pairs: int = 3000
    min_images: int = 1
    flip_augment: bool = True
    workers: int = 0
    resume: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1))
    init: Path | None = None  # start from this backbone (backbone.pt, RUN or .onnx); fixes arch and sizes


def validation_pairs(index: FaceIndex, identities: np.ndarray, max_pairs: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image-row pairs (P×2) and labels: genuine pairs within each identity, as many impostors."""
    rng = np.random.default_rng(seed)
    genuine = []
    for ident in identities:
        rows = index.images_of(int(ident))
        pairs = [(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
        rng.shuffle(pairs)
        genuine += pairs[:10]
    rng.shuffle(genuine)
    genuine = genuine[: max_pairs // 2]
    owner = index.image_identity
    pool = (np.concatenate([index.images_of(int(i)) for i in identities]) if len(identities)
            else np.array([], int))
    impostor: list[tuple[int, int]] = []
    while len(impostor) < len(genuine) and len(identities) > 1:
        a, b = rng.choice(pool, 2, replace=False)
        if owner[a] != owner[b]:
            impostor.append((int(a), int(b)))
    pairs = np.asarray(genuine + impostor, dtype=np.int64).reshape(-1, 2)
    same = np.concatenate([np.ones(len(genuine), np.int64), np.zeros(len(impostor), np.int64)])
    return pairs, same


def evaluate_pairs(backbone_like, index: FaceIndex, pairs: np.ndarray, same: np.ndarray, *,
                   batch_size: int, workers: int) -> dict[str, Any]:
    """Verification accuracy (10-fold) of the pairs, embedding each image once."""
    if len(pairs) == 0:
        return {}
    rows = np.unique(pairs)
    emb = embed_paths(backbone_like, [index.path(r) for r in rows], batch_size=batch_size, workers=workers,
                      description="validate")
    pos = {int(r): k for k, r in enumerate(rows)}
    a = np.array([pos[int(x)] for x in pairs[:, 0]])
    b = np.array([pos[int(x)] for x in pairs[:, 1]])
    good = emb.ok[a] & emb.ok[b]
    scores = (emb.vectors[a] * emb.vectors[b]).sum(1)[good]
    acc, std = kfold_accuracy(scores, same[good], folds=10)
    return {"val_accuracy": acc, "val_accuracy_std": std, "val_pairs": int(good.sum())}


def check_loss_options(cfg: PretrainConfig) -> bool:
    """Refuse impossible loss/sampler combinations before any work; True when batches are P×K."""
    resolve_loss_options(cfg.loss, cfg.loss_kwargs)
    p, k = cfg.pk_identities, cfg.pk_images
    if (p > 0) != (k > 0) or p < 0 or k < 0:
        raise LblError(f"--pk-identities {p} --pk-images {k}: give both (e.g. --pk-identities 16 "
                       "--pk-images 4) or neither")
    if cfg.loss in NEEDS_PK and not p:
        raise LblError(f"--loss {cfg.loss}: needs genuine pairs in every batch; add --pk-identities P "
                       "--pk-images K (e.g. 16 and 4)")
    if cfg.pk_id_spot and not p:
        raise LblError("--pk-id-spot: takes P×K batches; add --pk-identities P --pk-images K (e.g. 16 and 2)")
    return p > 0


def batch_size_of(cfg: PretrainConfig) -> int:
    """The batch size: P·K for P×K batches (a different explicit size is refused), else the given or 128."""
    p, k, b = cfg.pk_identities, cfg.pk_images, cfg.batch_size
    if p or k:
        if b and b != p * k:
            raise LblError(f"--batch-size {b}: with --pk-identities {p} --pk-images {k} a batch holds {p * k}; "
                           "drop --batch-size")
        b = p * k
    b = b or 128
    if b < 2:
        raise LblError(f"--batch-size {b}: need at least 2")
    return b


def run(cfg: PretrainConfig, device: torch.device | str = "auto") -> Summary:
    """Train, write ``OUT/backbone.pt``, checkpoints, ``log.jsonl`` and the manifest.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the backbone is data parallel (DDP), each rank
    takes its slice of every global batch and holds N/world rows of the classifier; rank 0 alone
    writes the backbone, the log, the manifest and prints.
    """
    env, device = dist_env.join(device)  # under torchrun: cuda:LOCAL_RANK, the process group joined
    return Summary("pretrain", pretrain(replace(cfg, batch_size=batch_size_of(cfg)), device, env))


def pretrain(cfg: PretrainConfig, device: torch.device, env: dist_env.DistEnv | None = None) -> dict[str, Any]:
    """Train, write ``OUT/backbone.pt``, checkpoints, ``log.jsonl`` and the manifest; return a summary."""
    env = env or dist_env.DistEnv()
    if not cfg.batch_size:  # run() applies the whole P×K rule; here only the default
        cfg = replace(cfg, batch_size=batch_size_of(cfg))
    if env.active and cfg.loss not in MARGIN_HEADS:
        raise LblError(f"--loss {cfg.loss}: under torchrun only {', '.join(MARGIN_HEADS)} shard their classifier")
    if env.active and cfg.batch_size % env.world_size:
        raise LblError(f"--batch-size {cfg.batch_size}: must be a multiple of the {env.world_size} processes "
                       "(each takes an equal slice of every batch)")
    out = Path(cfg.out)
    use_pk = check_loss_options(cfg)
    init = apply_init(cfg, device)  # before any data is read: a wrong --init is one error
    if latest_checkpoint(out) is not None and not cfg.resume:
        raise LblError(f"--out {out}: holds checkpoints of an earlier run; add --resume to continue it "
                       "or choose a new --out")
    index = open_face_set(cfg.data)
    input_size = cfg.input_size or default_input_size(cfg.arch)
    preprocess = Preprocess(input_size, cfg.center_crop)
    if not 0.0 < cfg.center_crop <= 1.0:
        raise LblError(f"--center-crop {cfg.center_crop}: must be in (0, 1]")
    train_ids, val_ids = split_identities(index, cfg.val_fraction, cfg.train.seed)
    train_ids = train_ids[index.counts()[train_ids] >= cfg.min_images]
    if len(train_ids) < 2:
        raise LblError(f"--data {cfg.data}: {len(train_ids)} training identities; need at least 2")
    labels_of_identity = np.full(index.num_identities, -1, dtype=np.int64)
    labels_of_identity[train_ids] = np.arange(len(train_ids))
    rows = index.select_images("all", train_ids)
    labels = labels_of_identity[index.image_identity[rows]]
    is_id = index.is_id[rows] if cfg.pk_id_spot else None
    if use_pk:
        pk = PKBatchSampler(labels, cfg.pk_identities, cfg.pk_images, cfg.train.seed, is_id=is_id)
        steps_per_epoch = pk.batches_per_epoch()
    else:
        if len(rows) < cfg.batch_size:
            raise LblError(f"--batch-size {cfg.batch_size}: larger than the {len(rows)} training images")
        steps_per_epoch = len(rows) // cfg.batch_size
    tcfg = cfg.train
    if cfg.epochs is not None:
        tcfg.steps = cfg.epochs * steps_per_epoch

    model = (init.model if init is not None else
             create_backbone(cfg.arch, cfg.embedding_size, input_size, **cfg.arch_kwargs)).to(device)
    if cfg.loss in MARGIN_HEADS:  # the classifier split by rank (one rank: all of it)
        objective: nn.Module = ShardedObjective(cfg.loss, len(train_ids), cfg.embedding_size, cfg.loss_kwargs, env,
                                                seed=cfg.train.seed).to(device)
    else:
        objective = Objective(cfg.loss, len(train_ids), cfg.embedding_size, cfg.loss_kwargs).to(device)
    forward = model
    if env.active:
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    state = objective.state_modules()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    loss_params = [p for m in state.values() for p in m.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0})
    trainer = Trainer(tcfg, device, {"backbone": model, **state}, groups, out, env=env)
    data_fp = describe_input(cfg.data)
    loss_state = {"loss": cfg.loss, "loss_kwargs": dict(objective.options),
                  "pk": [cfg.pk_identities, cfg.pk_images], "arch": cfg.arch, "pk_id_spot": cfg.pk_id_spot}
    if cfg.resume:
        try:
            step = trainer.resume()
        except (KeyError, RuntimeError) as exc:
            raise LblError(f"--resume: the checkpoint in {out} was made with another --arch/--loss/"
                           f"--embedding-size ({str(exc).splitlines()[0][:80]}); resume with the same "
                           "options or use a new --out") from None
        if step and trainer.extra_state.get("data_images") != int(index.num_images):
            raise LblError(f"--resume: {cfg.data} has changed since the checkpoint "
                           f"({trainer.extra_state.get('data_images')} → {index.num_images} images)")
        saved = {k: trainer.extra_state[k] for k in loss_state if k in trainer.extra_state}
        now = {k: loss_state[k] for k in saved}
        if step and saved != now:
            raise LblError(f"--resume: the checkpoint was made with {saved}, now {now}; resume with the "
                           "same options or use a new --out")
        if step:
            ui.info(f"resuming from step {step}")
    trainer.extra_state = {"data_images": int(index.num_images), "identities": int(index.num_identities),
                           **loss_state}

    dataset = FaceDataset(index, rows, labels, preprocess)
    problems = ProblemLog()
    seen_bad: set[str] = set()

    def batches(epoch: int, start: int):
        sampler: EpochBatchSampler | PKBatchSampler
        if use_pk:
            sampler = PKBatchSampler(labels, cfg.pk_identities, cfg.pk_images, tcfg.seed, epoch=epoch,
                                     start=start, is_id=is_id)
        else:
            sampler = EpochBatchSampler(len(rows), cfg.batch_size, tcfg.seed, epoch=epoch, start=start)
        if env.active:
            sampler = RankSlice(sampler, env)
        return make_loader(dataset, batch_sampler=sampler, workers=cfg.workers)

    def compute(batch) -> StepResult | None:
        for p in batch.problems:
            if p.path not in seen_bad:
                seen_bad.add(p.path)
                problems.add(p.path, p.reason)
        if len(batch) < 2 and not env.active:  # under torchrun every rank must join every step
            return None
        images = batch.images.to(device, non_blocking=True)
        if cfg.flip_augment:  # drawn for the whole global batch, so that W ranks flip what 1 rank would
            n = cfg.batch_size if env.active else len(images)
            first = env.rank * (n // env.world_size)
            flip = (torch.rand(n, generator=trainer.aug) < 0.5)[first:first + len(images)]
            images[flip.to(device)] = images[flip.to(device)].flip(-1)
        y = batch.labels.to(device)
        with trainer.autocast():
            emb = forward(images)
        out_ = objective(emb.float(), y)
        return StepResult(out_.loss, len(y), out_.metrics)

    val_pairs, val_same = validation_pairs(index, val_ids, cfg.val_max_pairs, tcfg.seed)

    def on_epoch_end(epoch: int) -> dict[str, Any]:
        if not env.is_main:
            return {}
        live = Backbone(model, cfg.arch, cfg.embedding_size, preprocess, "", out / FILENAME, device)  # in training
        res = evaluate_pairs(live, index, val_pairs, val_same, batch_size=cfg.batch_size, workers=cfg.workers)
        if res:
            ui.info(f"epoch {epoch + 1}: validation accuracy {res['val_accuracy']:.4f} "
                    f"± {res['val_accuracy_std']:.4f} on {res['val_pairs']} pairs of held-out identities")
        return res

    stats = trainer.fit(batches, compute, steps_per_epoch=steps_per_epoch, on_epoch_end=on_epoch_end,
                        description="pretrain")
    val = stats.get("last_epoch") or on_epoch_end(trainer.epoch)

    if not env.is_main:  # rank 0 writes what the run leaves behind
        return {"rank": env.rank, **stats}
    fingerprint = save_backbone(out / FILENAME, model, arch=cfg.arch, embedding_size=cfg.embedding_size,
                                preprocess=preprocess, arch_kwargs=cfg.arch_kwargs,
                                extra={"loss": cfg.loss, "loss_kwargs": dict(objective.options),
                                       "steps": trainer.step})
    if problems.count:
        problems.write_csv(out / "problems.csv")
    params = {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "train")}
    params["arch_kwargs"] = manifest_arch_kwargs(cfg.arch_kwargs)
    params["train"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(tcfg).items()}
    summary = {
        "out": str(out), "backbone": str(out / FILENAME), "backbone_fingerprint": fingerprint,
        "arch": cfg.arch, "embedding_size": cfg.embedding_size, "input_size": input_size,
        "train_identities": int(len(train_ids)), "train_images": int(len(rows)),
        "val_identities": int(len(val_ids)), **stats, **val,
        "problems": problems.summary(),
        "device": str(device), "processes": env.world_size,
    }
    summary["loss"] = cfg.loss
    summary["loss_options"] = dict(objective.options)
    summary["classifier"] = cfg.loss not in METRIC_LOSSES  # triplet/contrastive train the backbone alone
    if use_pk:
        summary["batches"] = {"identities": cfg.pk_identities, "photos_per_identity": cfg.pk_images,
                              "id_spot": cfg.pk_id_spot, "identities_sampled": len(pk.groups)}
    summary.pop("last_epoch", None)
    files = [FILENAME, LOG_FILE] + (["problems.csv"] if problems.count else [])
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        files.append(f"{CHECKPOINT_DIR}/{ckpt.name}")
    inputs = {"data": data_fp, **({"init": describe_input(cfg.init)} if cfg.init is not None else {})}
    write_manifest(out, "backbone", params=params, inputs=inputs, files=files,
                   embedding_size=cfg.embedding_size, backbone_fingerprint=fingerprint,
                   extra={"summary": {k: summary[k] for k in ("steps", "final_loss") if k in summary} | val})
    return summary
