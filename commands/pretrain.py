"""Train a backbone with a margin softmax, centre, pair-verification or triplet loss.

Reads identity folders DATA/IDENTITY/IMAGE (a CSV identity,image[,kind] or an insightface .rec folder) and
writes OUT/backbone.pt (architecture + preprocessing + weights), OUT/checkpoints/, OUT/log.jsonl, OUT/curves.png
and OUT/manifest.json. Held-out identities give a verification accuracy after each epoch. A killed run goes on
with the same command plus --resume; --init starts from a backbone; --nproc N runs N processes (torchrun).

Examples (CPU, a few minutes, on the shipped demo faces; triplet and pair need P identities × K photos):

    lblctl pretrain --data examples/data/faces --out run --arch small_cnn --input-size 48 --center-crop 0.6 --epochs 3
    lblctl pretrain --data examples/data/faces --out run-tri --input-size 48 --center-crop 0.6 --epochs 3 --loss triplet --pk-identities 16 --pk-images 4
    lblctl pretrain --data ids --out run-v --init run --loss contrastive --pk-identities 16 --pk-images 2 --pk-id-spot --epochs 2
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from . import _common as o
from ._common import Common, Opt, stage_command

Backbones = "iresnet18, iresnet34, iresnet50, iresnet100, mobilefacenet, small_cnn"  # a test checks the registry


def _loss(flags: list[str], kind: type, help: str) -> object:
    return Annotated[kind | None, Opt(*flags, help=help, rich_help_panel="Loss")]


@stage_command("pretrain")
def main(
    data: o.IdsData,
    out: o.RunOut,
    arch: Annotated[str, Opt(help=f"Backbone: {Backbones} (default small_cnn, or --init's).")] = "",
    embedding_size: Annotated[int, Opt(help="Embedding dimension (default 512, or --init's).")] = 0,
    init: Annotated[Path | None, Opt("--init", help="Start from this backbone's weights: RUN, backbone.pt or an "
                                     "ONNX recognition model (needs lblctl[onnx]).")] = None,
    input_size: Annotated[int, Opt(help="Input side in pixels (0 = the arch's default).")] = 0,
    center_crop: Annotated[float, Opt(help="Keep this central fraction of each image first (0.6 for un-aligned "
                                      "LFW-a; 1.0 for aligned crops; default 1.0, or --init's).")] = 0.0,
    width: Annotated[int, Opt(help="small_cnn base width (channels of the first convs).")] = 32,
    loss: Annotated[str, Opt(help="cosface (AM-softmax), arcface, combined (m1,m2,m3), center (softmax + λ·centre), "
                             "pair (softmax + w·same/different head; needs P×K), triplet or contrastive (no "
                             "classifier; need P×K).")] = "cosface",
    scale: _loss(["--scale", "-s"], float, "Margin-softmax scale s (default 24 for cosface, 64 for arcface/combined).")
    = None,
    margin: _loss(["--margin", "-m"], float, "Margin m (default 0.2 cosface, 0.5 arcface).") = None,
    m1: _loss(["--m1"], float, "combined: angle multiplier (default 1.0).") = None,
    m2: _loss(["--m2"], float, "combined: additive angle (default 0.3).") = None,
    m3: _loss(["--m3"], float, "combined: additive cosine (default 0.2).") = None,
    head: _loss(["--head"], str, "center/pair: the softmax head, cosface, arcface or combined (default cosface).")
    = None,
    center_alpha: _loss(["--center-alpha"], float, "center: centres' own learning rate α (default 0.5).") = None,
    center_weight: _loss(["--center-weight"], float, "center: weight λ of the centre loss (default 0.1).") = None,
    pair_weight: _loss(["--pair-weight"], float, "pair: weight of the same/different loss (default 0.5).") = None,
    triplet_margin: _loss(["--triplet-margin"], float, "triplet: margin α on squared distances (default 0.2).")
    = None,
    mining: _loss(["--mining"], str, "triplet: semihard (FaceNet, default) or batchhard; contrastive: batchhard "
                  "(default: each anchor's hardest positive and negative in the batch) or all.") = None,
    pos_margin: _loss(["--pos-margin"], float, "contrastive: genuine pairs pulled up to this cosine (default 0.5).")
    = None,
    neg_margin: _loss(["--neg-margin"], float, "contrastive: impostor pairs pushed down to this cosine "
                      "(default 0.2).") = None,
    pk_identities: Annotated[int, Opt("--pk-identities", help="P×K batches: P identities per batch (with "
                                      "--pk-images).", rich_help_panel="Loss")] = 0,
    pk_images: Annotated[int, Opt("--pk-images", help="P×K batches: K photos per identity.",
                                  rich_help_panel="Loss")] = 0,
    pk_id_spot: Annotated[bool, Opt("--pk-id-spot", help="P×K batches: each identity's K photos are its ID photo + "
                                    "K−1 spot photos (the V stage of the CVC recipe).",
                                    rich_help_panel="Loss")] = False,
    batch_size: Annotated[int, Opt(help="Images per step (0 = 128, or P·K with --pk-*).")] = 0,
    epochs: Annotated[int, Opt(help="Epochs (overrides --steps when > 0).")] = 0,
    steps: o.Steps = 1000,
    lr: Annotated[float, Opt(help="Base learning rate.")] = 0.1,
    optimizer: Annotated[str, Opt(help="sgd or adamw.")] = "sgd",
    weight_decay: o.WeightDecay = 5e-4,
    schedule: o.Schedule = "cosine",
    warmup_steps: o.Warmup = 0,
    grad_clip: o.GradClip = 5.0,
    amp: o.Amp = "auto",
    val_fraction: Annotated[float, Opt(help="Fraction of identities with ≥2 photos held out.")] = 0.1,
    min_images: Annotated[int, Opt(help="Train only on identities with at least this many photos.")] = 1,
    checkpoint_every: o.CheckpointEvery = 0,
    log_every: o.LogEvery = 10,
    workers: o.Workers = -1,
    resume: o.Resume = False,
    tensorboard: o.Tensorboard = False,
    nproc: o.Nproc = 1,
    *,
    common: Common,
):
    from lblctl.cli import relaunch
    from lblctl.core.runtime import default_workers
    from lblctl.stages.pretrain import PretrainConfig, run
    from lblctl.train.engine import TrainConfig

    relaunch(nproc)
    loss_kwargs = {"s": scale, "m": margin, "m1": m1, "m2": m2, "m3": m3, "head": head, "center_alpha": center_alpha,
                   "center_weight": center_weight, "pair_weight": pair_weight, "triplet_margin": triplet_margin,
                   "mining": mining, "pos_margin": pos_margin, "neg_margin": neg_margin}
    train = TrainConfig(steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
                        warmup_steps=warmup_steps, grad_clip=grad_clip, amp=amp, checkpoint_every=checkpoint_every,
                        log_every=log_every, seed=common.seed, tensorboard=tensorboard)
    return run(PretrainConfig(
        data=data, out=out, arch=arch, embedding_size=embedding_size, input_size=input_size or None,
        center_crop=center_crop, arch_kwargs={"width": width} if arch in ("small_cnn", "") else {}, init=init,
        loss=loss, loss_kwargs={k: v for k, v in loss_kwargs.items() if v is not None}, batch_size=batch_size,
        pk_identities=pk_identities, pk_images=pk_images, pk_id_spot=pk_id_spot, epochs=epochs or None, val_fraction=val_fraction,
        min_images=min_images, workers=default_workers(workers), resume=resume, train=train), common.device)
