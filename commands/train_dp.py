"""Fine-tune a backbone and the prototype store with dominant-prototype softmax (DP-softmax).

Each step samples S identities, adds identities from their dominant queues until K classes are
chosen, gathers only those K prototypes from the store onto the device, trains a margin softmax
over them on ID and spot photos of those classes, writes the K rows back and updates the queues.
GPU memory does not grow with the number of identities.

Reads DATA (identity folders), BACKBONE (RUN/backbone.pt) and STORE (after imprint and
build-index); writes OUT/backbone.pt, OUT/checkpoints/, OUT/log.jsonl, OUT/manifest.json and
updates the store and its queues in place (or in a copy: --out-store).

Example (CPU, on the demo faces, after imprint + build-index):

    lblctl train-dp --data examples/data/faces --backbone run/backbone.pt --store store --out run2 --classes 32 --sampled 8 --steps 50

Head-only training over precomputed embeddings (no images, no backbone):

    lblctl train-dp --features feats.h5 --store store --out run2 --classes 1024 --sampled 256 --steps 1000

Baselines in the same engine: --head random (Partial-FC-style random negatives) and --head full
(all N prototypes on the device). A killed run continues with the same command plus --resume.

Many processes (torchrun; --nproc N starts it on this machine): the store must be sharded for N
(lblctl reshard); each rank trains the rows of its own shard, STORE/shard-RRRRR-of-WWWWW/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from . import _common as o
from ._common import Common, Opt, stage_command


@stage_command("train-dp")
def main(
    store: Annotated[Path, Opt("--store", help="Prototype store folder (imprint + build-index).")],
    out: o.RunOut,
    data: Annotated[Path | None, Opt("--data", help="Identity folders DATA/IDENTITY/IMAGE or a CSV.")] = None,
    backbone: Annotated[Path | None, Opt("--backbone", help="RUN/backbone.pt (or the RUN folder).")] = None,
    features: Annotated[Path | None, Opt("--features", help="Head-only: HDF5 features M×D + identities M.")] = None,
    out_store: Annotated[Path | None, Opt("--out-store", help="Train a copy of the store here.")] = None,
    head: Annotated[str, Opt(help="dp (dominant prototypes), random (Partial-FC-style) or full (all N).")] = "dp",
    classes: Annotated[int, Opt("--classes", "-K", help="K: classes (prototypes on the device) per step.")] = 256,
    sampled: Annotated[int, Opt("--sampled", "-S", help="S: identities sampled per step (rest: queues).")] = 64,
    hard_fraction: Annotated[float, Opt(help="--head dp: share of the K − S non-sampled classes taken from the "
                                        "dominant queues; the rest are random rows (1 = queues only; see README).")] = 0.5,
    photos_per_class: Annotated[int, Opt(help="Photos per class in the batch (ID photo first, then spot).")] = 2,
    batch_size: Annotated[int, Opt(help="Images per step (0 = K × photos-per-class).")] = 0,
    loss: Annotated[str, Opt(help="cosface (AM-softmax) or arcface.")] = "cosface",
    scale: Annotated[float | None, Opt("--scale", "-s", help="Margin-softmax scale s (default 24 cosface, "
                                       "64 arcface).")] = None,
    margin: Annotated[float | None, Opt("--margin", "-m", help="Margin m (default 0.2 cosface, "
                                        "0.5 arcface).")] = None,
    lr: Annotated[float, Opt(help="Backbone learning rate.")] = 0.01,
    head_lr: Annotated[float, Opt(help="Prototype learning rate (0 = 0.5 × images per step / 256; see README).")] = 0.0,
    freeze_backbone: Annotated[bool, Opt("--freeze-backbone", help="Train the prototypes only.")] = False,
    freeze_bn: Annotated[bool, Opt("--freeze-bn/--train-bn", help="Fine-tuning: keep the backbone's BatchNorm "
                                   "statistics, or update them (the default; see README).")] = False,
    head_warmup: Annotated[float, Opt(help="Fine-tuning: fraction of the steps that train the prototypes "
                                      "only, before the backbone.")] = 0.0,
    projection: Annotated[bool, Opt("--projection", help="Head-only: also learn a linear projection.")] = False,
    steps: o.Steps = 1000,
    epochs: Annotated[int, Opt(help="Epochs: each trainable identity sampled once per epoch.")] = 0,
    weight_decay: o.WeightDecay = 5e-4,
    schedule: o.Schedule = "cosine",
    warmup_steps: o.Warmup = 0,
    grad_clip: o.GradClip = 5.0,
    amp: o.Amp = "auto",
    checkpoint_every: o.CheckpointEvery = 100,
    log_every: o.LogEvery = 10,
    workers: Annotated[int, Opt(help="Decoding threads (-1 = cores − 1).")] = -1,
    resume: o.Resume = False,
    tensorboard: o.Tensorboard = False,
    store_cache_rows: Annotated[int, Opt(help="Store write-back cache, rows (0 = what a checkpoint interval "
                                              "touches: K × --checkpoint-every, at least 65,536, at most 1/8 of "
                                              "free memory). Rows beyond it go to the store file before their "
                                              "checkpoint, with undo records (summary: store_spilled_rows).")] = 0,
    nproc: o.Nproc = 1,
    *,
    common: Common,
):
    from lblctl.cli import relaunch
    from lblctl.core.runtime import default_workers
    from lblctl.stages.train_dp import TrainDPConfig, run
    from lblctl.train.engine import TrainConfig

    relaunch(nproc)
    train = TrainConfig(steps=steps, lr=lr, optimizer="sgd", weight_decay=weight_decay, schedule=schedule,
                        warmup_steps=warmup_steps, grad_clip=grad_clip, amp=amp, checkpoint_every=checkpoint_every,
                        log_every=log_every, seed=common.seed, tensorboard=tensorboard)
    return run(TrainDPConfig(
        store=store, out=out, data=data, features=features, backbone=backbone, out_store=out_store, head=head,
        classes=classes, sampled=sampled, hard_fraction=hard_fraction, photos_per_class=photos_per_class, batch_size=batch_size, loss=loss,
        loss_kwargs={"s": scale, "m": margin}, head_lr=head_lr or None, freeze_backbone=freeze_backbone,
        freeze_bn=freeze_bn, head_warmup=head_warmup, projection=projection, epochs=epochs or None, workers=default_workers(workers), resume=resume,
        store_cache_rows=store_cache_rows or None, train=train), common.device)
