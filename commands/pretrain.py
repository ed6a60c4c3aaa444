"""Train a backbone with a margin softmax, centre, pair-verification or triplet loss.

Reads identity folders DATA/IDENTITY/IMAGE (or a CSV identity,image[,kind]) and writes
OUT/backbone.pt (architecture + preprocessing + weights), OUT/checkpoints/, OUT/log.jsonl and
OUT/manifest.json. A held-out set of identities gives a verification accuracy after each epoch.

Example (CPU, a few minutes, on the shipped demo faces):

    lblctl pretrain --data examples/data/faces --out run --arch small_cnn --input-size 48 --center-crop 0.6 --epochs 3

Other losses (ArcFace; triplet and pair need P identities × K photos per batch):

    lblctl pretrain --data examples/data/faces --out run-arc --input-size 48 --center-crop 0.6 --epochs 3 --loss arcface -s 32 -m 0.5
    lblctl pretrain --data examples/data/faces --out run-tri --input-size 48 --center-crop 0.6 --epochs 3 --loss triplet --pk-identities 16 --pk-images 4

Continue a killed run with the same command plus --resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lblctl.core.errors import LblError
from lblctl.core.runtime import default_workers
from lblctl.models.backbones import list_backbones
from lblctl.stages.pretrain import PretrainConfig, pretrain
from lblctl.train.engine import TrainConfig

from ._common import Debug, Device, Json, Quiet, Seed, finish, start

SHORT_HELP = "Train a backbone (small_cnn, iresnet…) with a margin softmax on labelled faces."


def main(
    data: Annotated[Path, typer.Option("--data", help="Identity folders DATA/IDENTITY/IMAGE or a CSV.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write (backbone.pt, checkpoints, log).")],
    arch: Annotated[str, typer.Option(help=f"Backbone: {', '.join(list_backbones())} (default small_cnn, "
                                      "or --init's).")] = "",
    embedding_size: Annotated[int, typer.Option(help="Embedding dimension (default 512, or --init's).")] = 0,
    init: Annotated[Path | None, typer.Option("--init", help="Start from this backbone's weights: RUN, "
                                              "backbone.pt or an ONNX recognition model (needs lblctl[onnx]).")
                    ] = None,
    input_size: Annotated[int, typer.Option(help="Input side in pixels (0 = the arch's default).")] = 0,
    center_crop: Annotated[float, typer.Option(help="Keep this central fraction of each image first "
                                               "(0.6 for un-aligned LFW-a; 1.0 for aligned crops; "
                                               "default 1.0, or --init's).")] = 0.0,
    width: Annotated[int, typer.Option(help="small_cnn base width (channels of the first convs).")] = 32,
    loss: Annotated[str, typer.Option(help="cosface (AM-softmax), arcface, combined (m1,m2,m3), center "
                                      "(softmax + λ·centre), pair (softmax + w·same/different head; "
                                      "needs P×K), triplet (needs P×K).")] = "cosface",
    scale: Annotated[float | None, typer.Option("--scale", "-s", help="Margin-softmax scale s "
                                                "(default 24 for cosface, 64 for arcface/combined).",
                                                rich_help_panel="Loss")] = None,
    margin: Annotated[float | None, typer.Option("--margin", "-m", help="Margin m (default 0.2 cosface, "
                                                 "0.5 arcface).", rich_help_panel="Loss")] = None,
    m1: Annotated[float | None, typer.Option("--m1", help="combined: angle multiplier (default 1.0).",
                                             rich_help_panel="Loss")] = None,
    m2: Annotated[float | None, typer.Option("--m2", help="combined: additive angle (default 0.3).",
                                             rich_help_panel="Loss")] = None,
    m3: Annotated[float | None, typer.Option("--m3", help="combined: additive cosine (default 0.2).",
                                             rich_help_panel="Loss")] = None,
    head: Annotated[str | None, typer.Option("--head", help="center/pair: the softmax head, cosface, "
                                             "arcface or combined (default cosface).",
                                             rich_help_panel="Loss")] = None,
    center_alpha: Annotated[float | None, typer.Option("--center-alpha", help="center: centres' own "
                                                       "learning rate α (default 0.5).",
                                                       rich_help_panel="Loss")] = None,
    center_weight: Annotated[float | None, typer.Option("--center-weight", help="center: weight λ of the "
                                                        "centre loss (default 0.1).",
                                                        rich_help_panel="Loss")] = None,
    pair_weight: Annotated[float | None, typer.Option("--pair-weight", help="pair: weight of the "
                                                      "same/different loss (default 0.5).",
                                                      rich_help_panel="Loss")] = None,
    triplet_margin: Annotated[float | None, typer.Option("--triplet-margin", help="triplet: margin α on "
                                                         "squared distances (default 0.2).",
                                                         rich_help_panel="Loss")] = None,
    mining: Annotated[str | None, typer.Option("--mining", help="triplet: semihard (FaceNet, default) or "
                                               "batchhard.", rich_help_panel="Loss")] = None,
    pk_identities: Annotated[int, typer.Option("--pk-identities", help="P×K batches: P identities per "
                                               "batch (with --pk-images).", rich_help_panel="Loss")] = 0,
    pk_images: Annotated[int, typer.Option("--pk-images", help="P×K batches: K photos per identity.",
                                           rich_help_panel="Loss")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per step (0 = 128, or P·K with --pk-*).")] = 0,
    epochs: Annotated[int, typer.Option(help="Epochs (overrides --steps when > 0).")] = 0,
    steps: Annotated[int, typer.Option(help="Optimisation steps (when --epochs is 0).")] = 1000,
    lr: Annotated[float, typer.Option(help="Base learning rate.")] = 0.1,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not on the classifier).")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="cosine, step or constant.")] = "cosine",
    warmup_steps: Annotated[int, typer.Option(help="Linear LR warm-up steps.")] = 0,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm (0 = off).")] = 5.0,
    amp: Annotated[str, typer.Option(help="auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16.")] = "auto",
    val_fraction: Annotated[float, typer.Option(help="Fraction of identities with ≥2 photos held out.")
                            ] = 0.1,
    min_images: Annotated[int, typer.Option(help="Train only on identities with at least this many photos.")
                          ] = 1,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0 = at the end only).")
                                ] = 0,
    log_every: Annotated[int, typer.Option(help="Write log.jsonl every N steps.")] = 10,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes (-1 = cores − 1).")] = -1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT's newest checkpoint.")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard events to OUT/tensorboard "
                                        "(needs the optional 'tensorboard' package: lblctl[tb]).")] = False,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    dev = start(device, seed, quiet)
    if pk_identities or pk_images:
        if batch_size and batch_size != pk_identities * pk_images:
            raise LblError(f"--batch-size {batch_size}: with --pk-identities {pk_identities} --pk-images "
                           f"{pk_images} a batch holds {pk_identities * pk_images}; drop --batch-size")
        batch_size = pk_identities * pk_images
    batch_size = batch_size or 128
    if batch_size < 2:
        raise LblError(f"--batch-size {batch_size}: need at least 2")
    loss_kwargs = {"s": scale, "m": margin, "m1": m1, "m2": m2, "m3": m3, "head": head,
                   "center_alpha": center_alpha, "center_weight": center_weight, "pair_weight": pair_weight,
                   "triplet_margin": triplet_margin, "mining": mining}
    cfg = PretrainConfig(
        data=data, out=out, arch=arch, embedding_size=embedding_size, input_size=input_size or None,
        center_crop=center_crop, arch_kwargs={"width": width} if arch in ("small_cnn", "") else {}, init=init,
        loss=loss, loss_kwargs={k: v for k, v in loss_kwargs.items() if v is not None},
        batch_size=batch_size, pk_identities=pk_identities, pk_images=pk_images,
        epochs=epochs or None, val_fraction=val_fraction, min_images=min_images,
        workers=default_workers(workers), resume=resume,
        train=TrainConfig(steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                          schedule=schedule,
                          warmup_steps=warmup_steps, grad_clip=grad_clip, amp=amp,
                          checkpoint_every=checkpoint_every, log_every=log_every, seed=seed,
                          tensorboard=tensorboard),
    )
    finish(pretrain(cfg, dev), "pretrain", json_out)
