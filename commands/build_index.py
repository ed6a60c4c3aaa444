"""Find every identity's nearest other prototypes (faiss) and write its candidate and dominant queues.

Reads the prototype store STORE (from `lblctl imprint`) and writes beside it: STORE/index.faiss,
STORE/queues.h5 (`candidates` N×cq, `candidate_scores`, `dominant` N×dq: row numbers, −1 padded,
never the identity itself), STORE/duplicates.csv (identity pairs so close they are probably one
person enrolled twice), optionally STORE/duplicates.html, and STORE/index_manifest.json.
The index is exact (flat) up to 50k identities, IVF above (IVF-PQ when the vectors do not fit in
memory); an approximate index's recall@cq is estimated against exact search and printed.

Example (after `lblctl imprint ... --out store`):

    lblctl build-index --store store --candidates 50 --dominant 20 --dup-html
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from ._common import Common, Opt, stage_command


@stage_command("build-index")
def main(
    store: Annotated[Path, Opt("--store", help="Prototype store folder (from `lblctl imprint`).")],
    candidates: Annotated[int, Opt("--candidates", help="Candidate queue length cq.")] = 50,
    dominant: Annotated[int, Opt("--dominant", help="Dominant queue length dq (≤ cq).")] = 20,
    index: Annotated[str, Opt("--index", help="auto | flat (exact) | ivf | ivfpq | hnsw.")] = "auto",
    nlist: Annotated[int, Opt(help="IVF lists (0 = about 2√N).")] = 0,
    nprobe: Annotated[int, Opt(help="IVF lists probed per query (0 = 8 for ivf, 32 for ivfpq).")] = 0,
    ef_search: Annotated[int, Opt(help="HNSW efSearch (0 = max(64, 2·(cq+1))).")] = 0,
    dup_threshold: Annotated[float | None, Opt(
        help="Report identity pairs with cosine ≥ this (default: median + 6·1.4826·MAD of the "
             "nearest-neighbour scores, at most 0.999).")] = None,
    dup_html: Annotated[bool, Opt("--dup-html", help="Also write duplicates.html with the ID photos "
                                  "of each pair side by side.")] = False,
    batch_size: Annotated[int, Opt(help="Queries per search batch.")] = 4096,
    recall_rows: Annotated[int, Opt(help="Random rows checked against exact search.")] = 1000,
    *,
    common: Common,
):
    from lblctl.stages.index import BuildIndexConfig, run

    return run(BuildIndexConfig(store=store, candidates=candidates, dominant=dominant, index=index, nlist=nlist,
                                nprobe=nprobe, ef_search=ef_search, dup_threshold=dup_threshold, dup_html=dup_html,
                                batch_size=batch_size, recall_rows=recall_rows, seed=common.seed), common.device)
