"""Lay a prototype store out for W ranks (train-dp under torchrun), or merge a sharded store into one plain store.

Reads STORE (plain: STORE/prototypes.h5; sharded: STORE/shards.json + STORE/shard-RRRRR-of-WWWWW/) and writes
OUT: with --world W > 1, one plain store per rank (global row r goes to rank r % W) and OUT/shards.json; with
--world 1, one plain store (what eval, export and build-index read). Rows are copied bit for bit with their
momentum, names, ID photos and queues (global row ids); the index, duplicate report and index manifest follow.
Streams a chunk of rows at a time. OUT is built in .OUT.reshard-tmp beside it and renamed at the end, so a
killed reshard leaves OUT untouched; run the same command again.

Examples:

    lblctl reshard --store store --world 8 --out store-w8        # then: torchrun --nproc-per-node=8 -m lblctl train-dp --store store-w8 …
    lblctl reshard --store store-w8 --world 4 --out store-w4     # another world size
    lblctl reshard --store store-w8 --world 1 --out store-merged # back to one plain store for eval / export
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ._common import Common, Opt, stage_command


@stage_command("reshard", device=False)
def main(
    store: Annotated[Path, Opt("--store", help="Prototype store folder, plain or sharded.")],
    world: Annotated[int, Opt("--world", help="Ranks to shard for (1 = merge into one plain store).")],
    out: Annotated[Path, Opt("--out", help="New store folder to write.")],
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace --out if it exists (only once the new one "
                                   "is complete).")] = False,
    chunk_rows: Annotated[int, Opt(help="Rows copied per chunk (memory: chunk × D × 4 bytes × 2).")] = 65536,
    *,
    common: Common,
):
    from lblctl.stages.reshard import ReshardConfig, run

    return run(ReshardConfig(store=store, out=out, world=world, overwrite=overwrite, chunk_rows=chunk_rows))
