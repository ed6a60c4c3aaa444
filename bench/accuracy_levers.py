"""One-seed lever sweeps for issue 17 on the accuracy bench's LFW split (its cached backbone, stores and features).

    nice -n 19 python bench/accuracy_levers.py SPECS.jsonl [OUT.jsonl]

SPECS: one JSON object a line, ``{"tag": …, "args": [train-dp options], "seed": 0, "mode": "features"|"images",
"start": "all"|"id"}``; each run goes through the CLI exactly as bench/accuracy_bench.py runs its variants, and
appends its figures (top-1/top-5, open set when fine-tuned, seconds, load average) to OUT (default
bench/results/accuracy_levers.jsonl). The specs behind the README's levers table are bench/accuracy_levers_*.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_bench as ab  # noqa: E402


def main() -> None:
    specs = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ab.RESULTS / "accuracy_levers.jsonl"
    ds = ab.Dataset("lfw", ab.pretrain_backbone(ab.TMP / "lfw", 4))
    for sp in specs:
        mode, start, seed = sp.get("mode", "features"), sp.get("start", "all"), sp.get("seed", 0)
        r = ds.train(sp["tag"], seed, mode, start, sp["args"])
        r.update(tag=sp["tag"], seed=seed, args=sp["args"], mode=mode, start=start, load=ab.loadavg())
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(sp["tag"], r["top1"], r["top5"], r["seconds"], r.get("open_set"), flush=True)


if __name__ == "__main__":
    main()
