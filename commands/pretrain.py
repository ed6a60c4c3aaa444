"""Train a backbone with a margin-softmax head on a labelled face set.

Reads identity folders DATA/<identity>/<image> (or a CSV identity,image[,kind]) and writes
OUT/backbone.pt (architecture + preprocessing + weights), OUT/checkpoints/, OUT/log.jsonl and
OUT/manifest.json. A held-out set of identities gives a verification accuracy after each epoch.

Example (CPU, a few minutes, on the shipped demo faces):

    lblctl pretrain --data examples/data/faces --out run --arch small_cnn --input-size 48 --center-crop 0.6 --epochs 3

Continue a killed run with the same command plus --resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lblctl.engine import TrainConfig
from lblctl.errors import LblError
from lblctl.models import list_backbones
from lblctl.pretrain import PretrainConfig, pretrain
from lblctl.runtime import default_workers

from ._common import Debug, Device, Json, Quiet, Seed, finish, start

SHORT_HELP = "Train a backbone (small_cnn, iresnet…) with a margin softmax on labelled faces."


def main(
    data: Annotated[Path, typer.Option("--data", help="Identity folders DATA/<identity>/<image> or a CSV.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write (backbone.pt, checkpoints, log).")],
    arch: Annotated[str, typer.Option(help=f"Backbone: {', '.join(list_backbones())}.")] = "small_cnn",
    embedding_size: Annotated[int, typer.Option(help="Embedding dimension.")] = 512,
    input_size: Annotated[int, typer.Option(help="Input side in pixels (0 = the arch's default).")] = 0,
    center_crop: Annotated[float, typer.Option(help="Keep this central fraction of each image first "
                                               "(0.6 for un-aligned LFW-a; 1.0 for aligned crops).")] = 1.0,
    width: Annotated[int, typer.Option(help="small_cnn base width (channels of the first convs).")] = 32,
    loss: Annotated[str, typer.Option(help="Loss: cosface (AM-softmax).")] = "cosface",
    scale: Annotated[float, typer.Option("--scale", "-s", help="Margin-softmax scale s.")] = 24.0,
    margin: Annotated[float, typer.Option("--margin", "-m", help="Margin m.")] = 0.2,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    epochs: Annotated[int, typer.Option(help="Epochs (overrides --steps when > 0).")] = 0,
    steps: Annotated[int, typer.Option(help="Optimisation steps (when --epochs is 0).")] = 1000,
    lr: Annotated[float, typer.Option(help="Base learning rate.")] = 0.1,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not on the classifier).")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="cosine, step or constant.")] = "cosine",
    warmup_steps: Annotated[int, typer.Option(help="Linear LR warm-up steps.")] = 0,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm (0 = off).")] = 5.0,
    amp: Annotated[str, typer.Option(help="auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16.")] = "auto",
    val_fraction: Annotated[float, typer.Option(help="Fraction of identities with ≥2 photos held out.")] = 0.1,
    min_images: Annotated[int, typer.Option(help="Train only on identities with at least this many photos.")] = 1,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0 = at the end only).")] = 0,
    log_every: Annotated[int, typer.Option(help="Write log.jsonl every N steps.")] = 10,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes (-1 = cores − 1).")] = -1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT's newest checkpoint.")] = False,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    dev = start(device, seed, quiet)
    if batch_size < 2:
        raise LblError(f"--batch-size {batch_size}: need at least 2")
    cfg = PretrainConfig(
        data=data, out=out, arch=arch, embedding_size=embedding_size, input_size=input_size or None,
        center_crop=center_crop, arch_kwargs={"width": width} if arch == "small_cnn" else {},
        loss=loss, loss_kwargs={"s": scale, "m": margin}, batch_size=batch_size,
        epochs=epochs or None, val_fraction=val_fraction, min_images=min_images,
        workers=default_workers() if workers < 0 else workers, resume=resume,
        train=TrainConfig(steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
                          warmup_steps=warmup_steps, grad_clip=grad_clip, amp=amp,
                          checkpoint_every=checkpoint_every, log_every=log_every, seed=seed),
    )
    finish(pretrain(cfg, dev), "pretrain", json_out)
