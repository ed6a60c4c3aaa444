"""Pack identity folders into an insightface RecordIO set (train.rec, train.idx, property).

The set reads back with lblctl (`--data OUT` in pretrain, imprint, train-dp, eval) and with
insightface / arcface_torch tools (MXFaceDataset, DALI's mxnet reader). Record 0 is the header,
records 1…M the images (label = identity), then one record per identity with its image range.
JPEG and PNG files are stored byte for byte (`--encode keep`, pixel-identical on reading); other
formats become PNG. Unreadable images are left out and listed in OUT/problems.csv.

Example (CPU, seconds):

    lblctl pack --data examples/data/faces --out faces_rec
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lblctl.stages.pack import PackConfig, run

from ._common import Debug, Json, Quiet, finish, start

SHORT_HELP = "Pack identity folders into an insightface .rec set (train.rec/.idx/property)."


def main(
    data: Annotated[Path, typer.Option("--data", help="Identity folders DATA/IDENTITY/IMAGE, a CSV "
                                       "identity,image[,kind] or another .rec folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write train.rec, train.idx, property into.")],
    encode: Annotated[str, typer.Option(help="keep (JPEG/PNG bytes as they are, others → PNG), png or jpg.")]
    = "keep",
    quality: Annotated[int, typer.Option(help="JPEG quality with --encode jpg.")] = 95,
    min_images: Annotated[int, typer.Option(help="Skip identities with fewer photos.")] = 1,
    json_out: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    start("cpu", 0, quiet)
    finish(run(PackConfig(data=data, out=out, encode=encode, quality=quality, min_images=min_images)),
           "pack", json_out)
