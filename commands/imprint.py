"""Fill a prototype store: one unit vector per identity, imprinted from its photos.

Each chosen photo (--photos id|spot|all) is embedded with the backbone, the unit embeddings of an
identity are averaged and the mean renormalised. Writes OUT/prototypes.h5 (prototypes N×D,
identities, id_photos), OUT/manifest.json, OUT/left_out.csv (identities with no readable photo,
never stored as zero rows) and OUT/problems.csv (unreadable images). Photos stream in identity
order, so memory does not grow with N; a killed run continues with the same command + --resume.

Example (CPU, seconds, on the shipped demo faces):

    lblctl imprint --data examples/data/faces --backbone run/backbone.pt --out store --photos id --flip

Without photos, from precomputed embeddings (HDF5 with 'features' M×D and 'identities' M; rows
of one identity are averaged):

    lblctl imprint --features feats.h5 --out store --dtype float16

On N GPUs (or N CPU processes), a store sharded for N ranks (OUT/shard-RRRRR-of-NNNNN/ + OUT/shards.json), each
rank embedding and writing its own share of the identities (as train-dp under torchrun reads it):

    lblctl imprint --data ids --backbone run/backbone.pt --out store-w4 --nproc 4
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ._common import BatchSize, Common, Nproc, Opt, Workers, stage_command


@stage_command("imprint")
def main(
    out: Annotated[Path, Opt("--out", help="Store folder to write (prototypes.h5, manifest.json).")],
    data: Annotated[Path | None, Opt("--data", help="Identity folders DATA/IDENTITY/IMAGE "
                                     "or a CSV identity,image[,kind].")] = None,
    backbone: Annotated[Path | None, Opt("--backbone", help="RUN/backbone.pt or the RUN folder "
                                         "(with --features: optional, ties the store to it).")] = None,
    features: Annotated[Path | None, Opt("--features", help="HDF5 with 'features' M×D and "
                                         "'identities' M, instead of --data.")] = None,
    photos: Annotated[str, Opt(help="Which photos to imprint from: id, spot or all.")] = "id",
    flip: Annotated[bool, Opt("--flip", help="Average each photo with its mirror image.")] = False,
    batch_size: BatchSize = 64,
    workers: Workers = -1,
    dtype: Annotated[str, Opt(help="Row type in the store: float32 or float16 (half the disk).")] = "float32",
    momentum: Annotated[bool, Opt("--momentum/--no-momentum", help="Keep per-identity SGD momentum "
                                  "beside the prototypes for train-dp (doubles the store).")] = True,
    resume: Annotated[bool, Opt("--resume", help="Continue an interrupted imprint in OUT.")] = False,
    nproc: Nproc = 1,
    *,
    common: Common,
):
    from lblctl.cli import relaunch
    from lblctl.core.runtime import default_workers
    from lblctl.stages.imprint import ImprintConfig, run

    relaunch(nproc)
    return run(ImprintConfig(out=out, data=data, backbone=backbone, features=features, photos=photos, flip=flip,
                             batch_size=batch_size, workers=default_workers(workers), dtype=dtype,
                             momentum=momentum, resume=resume), common.device)
