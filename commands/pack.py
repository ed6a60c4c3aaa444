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

from ._common import Common, Opt, stage_command


@stage_command("pack", device=False)
def main(
    data: Annotated[Path, Opt("--data", help="Identity folders DATA/IDENTITY/IMAGE, a CSV identity,image[,kind] "
                              "or another .rec folder.")],
    out: Annotated[Path, Opt("--out", help="Folder to write train.rec, train.idx, property into.")],
    encode: Annotated[str, Opt(help="keep (JPEG/PNG bytes as they are, others → PNG), png or jpg.")] = "keep",
    quality: Annotated[int, Opt(help="JPEG quality with --encode jpg.")] = 95,
    min_images: Annotated[int, Opt(help="Skip identities with fewer photos.")] = 1,
    *,
    common: Common,
):
    from lblctl.stages.pack import PackConfig, run

    return run(PackConfig(data=data, out=out, encode=encode, quality=quality, min_images=min_images))
