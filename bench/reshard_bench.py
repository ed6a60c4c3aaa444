"""reshard's memory and time against N: plain → W shards → plain, peak anonymous RSS sampled while it runs.

Each N gets a synthetic store (random unit rows, momentum, names ``person_XXXXXXXX``); the reshard runs in a
fresh process that samples its own RssAnon every 10 ms (file-backed pages of the memory-mapped stores are
not counted: the kernel may drop them). Memory should be one chunk of rows plus the names (~N × 25 bytes),
the rows themselves never held whole.

    nice -n 10 python bench/reshard_bench.py --rows 100000 1000000 --dim 64 --world 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {bench!r})
from _common import anon_rss_mib
from lblctl.core import ui
from lblctl.stages.reshard import reshard
ui.set_quiet(True)
peak = [anon_rss_mib()]
start_rss = peak[0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_rss_mib())
        time.sleep(0.01)
t = threading.Thread(target=sample, daemon=True)
t.start()
t0 = time.perf_counter()
reshard({src!r}, {dst!r}, {world}, chunk_rows={chunk})
seconds = time.perf_counter() - t0
done.set(); t.join()
print(json.dumps({{"seconds": round(seconds, 2), "anon_rss_mib_start": round(start_rss, 1),
                  "anon_rss_mib_peak": round(peak[0], 1)}}))
"""


def make_store(folder: Path, n: int, dim: int, seed: int = 0) -> None:
    from lblctl.core import ui
    from lblctl.core.store import PrototypeStore
    from lblctl.core.strings import StringArrayBuilder

    ui.set_quiet(True)
    names = StringArrayBuilder()
    for i in range(n):
        names.append(f"person_{i:08d}")
    rng = np.random.default_rng(seed)
    with PrototypeStore.create(folder, dim, names.build(), momentum=True, cache="mmap") as store:
        for a in range(0, n, 65536):
            store.fill(a, rng.standard_normal((min(n, a + 65536) - a, dim)).astype(np.float32))


def run_child(src: Path, dst: Path, world: int, chunk: int) -> dict[str, float]:
    code = _CHILD.format(bench=str(Path(__file__).resolve().parent), src=str(src), dst=str(dst), world=world,
                         chunk=chunk)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--tmp", type=Path, default=None, help="Scratch folder (default: a temp dir).")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for n in args.rows:
            root = Path(tmp) / f"n{n}"
            make_store(root / "plain", n, args.dim)
            load = os.getloadavg()
            split = run_child(root / "plain", root / "sharded", args.world, args.chunk)
            merge = run_child(root / "sharded", root / "merged", 1, args.chunk)
            store_mib = n * args.dim * 4 * 2 / 2**20
            rows.append({"rows": n, "dim": args.dim, "world": args.world, "store_rows_mib": round(store_mib, 1),
                         "split": split, "merge": merge, "loadavg_before": [round(x, 2) for x in load]})
            print(json.dumps(rows[-1]), flush=True)
            import shutil

            shutil.rmtree(root)
    md = ["| N | D | rows+momentum MiB | → W | split s | split peak anon RSS MiB | merge s | merge peak anon RSS MiB "
          "| load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['rows']:,} | {r['dim']} | {r['store_rows_mib']} | {r['world']} | {r['split']['seconds']} | "
                  f"{r['split']['anon_rss_mib_peak']} | {r['merge']['seconds']} | {r['merge']['anon_rss_mib_peak']} | "
                  f"{' '.join(str(x) for x in r['loadavg_before'])} |")
    md.append("\nAnonymous RSS includes the Python/numpy/h5py/torch imports (the start figure in the JSON) and the "
              "names (about 25 bytes each here); the rows stream a chunk at a time.")
    write_results("reshard_bench", {"command": " ".join(sys.argv), "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
