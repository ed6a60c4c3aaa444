"""Each pretrain loss for the same budget: held-out verification accuracy of a small CNN on LFW.

Trains ``small_cnn`` on the LFW-a identities with at least ``--min-images`` photos (un-aligned
250×250 gray, so ``--center-crop 0.6``), once per loss, with the same steps, P×K batches, learning
rate schedule and seed, and records the 10-fold verification accuracy on pairs of the held-out
identities (never trained on) that ``pretrain`` measures after every epoch.

    /work/venv/bin/python bench/loss_bench.py              # six losses × 120 steps (~6 min on 2 cores)
    /work/venv/bin/python bench/loss_bench.py --quick      # seconds: plumbing only
    /work/venv/bin/python bench/loss_bench.py --steps 600 --width 32 --losses cosface,arcface
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from lblctl.core import ui  # noqa: E402
from lblctl.core.runtime import seed_everything  # noqa: E402
from lblctl.data.faces import Preprocess, open_face_set, split_identities  # noqa: E402
from lblctl.models.backbones import create_backbone  # noqa: E402
from lblctl.stages.pretrain import (  # noqa: E402
    PretrainConfig,
    _LiveBackbone,
    evaluate_pairs,
    pretrain,
    validation_pairs,
)
from lblctl.train.engine import TrainConfig  # noqa: E402

LFW = Path(os.environ.get("LBLCTL_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data" / "lfw"

# The options each loss runs with. Scales of 32 rather than insightface's 64 for ArcFace / combined:
# with a few hundred steps on a few hundred identities, s = 64 barely moves off the start.
LOSSES: dict[str, dict[str, Any]] = {
    "cosface": {"s": 24.0, "m": 0.2},
    "arcface": {"s": 32.0, "m": 0.5},
    "combined": {"s": 32.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
    "center": {"s": 24.0, "m": 0.2, "center_alpha": 0.5, "center_weight": 0.1},
    "pair": {"s": 24.0, "m": 0.2, "pair_weight": 0.5},
    "triplet": {"triplet_margin": 0.2, "mining": "semihard"},
    "triplet-batchhard": {"triplet_margin": 0.2, "mining": "batchhard"},
}


def subset_csv(folder: Path, min_images: int, max_identities: int) -> tuple[Path, int, int]:
    """A CSV identity,image of the LFW identities with ≥ min_images photos (absolute paths)."""
    rows = []
    names = sorted(n for n in os.listdir(LFW) if len(os.listdir(LFW / n)) >= min_images)[:max_identities or None]
    for n in names:
        rows += [(n, str(LFW / n / f)) for f in sorted(os.listdir(LFW / n))]
    path = folder / "lfw_subset.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["identity", "image"])
        w.writerows(rows)
    return path, len(names), len(rows)


def untrained_baseline(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same architecture and seed with no training, on the same held-out pairs as pretrain."""
    index = open_face_set(data)
    _, val_ids = split_identities(index, args.val_fraction, args.seed)
    pairs, same = validation_pairs(index, val_ids, args.val_pairs, args.seed)
    seed_everything(args.seed)
    model = create_backbone("small_cnn", args.embedding_size, args.input_size, width=args.width)
    live = _LiveBackbone(model, Preprocess(args.input_size, 0.6), args.embedding_size, torch.device("cpu"))
    t0 = time.perf_counter()
    res = evaluate_pairs(live, index, pairs, same, batch_size=64, workers=args.workers)
    return {"loss": "untrained", "options": {}, "steps": 0, "epochs": 0,
            "seconds": round(time.perf_counter() - t0, 1), "final_train_loss": None, **res,
            "val_identities": int(len(val_ids)), "train_identities": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 steps on 40 identities, 32 px: seconds")
    ap.add_argument("--losses", default="cosface,arcface,combined,center,pair,triplet",
                    help="comma-separated subset of " + ",".join(LOSSES))
    ap.add_argument("--steps", type=int, default=120, help="optimisation steps per loss")
    ap.add_argument("--pk-identities", type=int, default=16)
    ap.add_argument("--pk-images", type=int, default=4)
    ap.add_argument("--min-images", type=int, default=4)
    ap.add_argument("--max-identities", type=int, default=0, help="0 = all with ≥ --min-images photos")
    ap.add_argument("--input-size", type=int, default=48)
    ap.add_argument("--width", type=int, default=16, help="small_cnn base width")
    ap.add_argument("--embedding-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--val-pairs", type=int, default=800, help="at most this many held-out pairs (half genuine)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core box more threads oversubscribe; 0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.max_identities, args.input_size, args.width = 3, 40, 32, 8
    names = [x for x in args.losses.split(",") if x]
    unknown = [x for x in names if x not in LOSSES]
    if unknown:
        ap.error(f"unknown losses {unknown}; choose from {list(LOSSES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ui.set_quiet(True)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data, n_ids, n_images = subset_csv(Path(tmp), args.min_images, args.max_identities)
        print(f"LFW subset: {n_ids} identities with ≥ {args.min_images} photos, {n_images} images; "
              f"{args.steps} steps of {args.pk_identities}×{args.pk_images} per loss", flush=True)
        base = untrained_baseline(data, args)
        results.append(base)
        print(f"{'untrained':>18}: val acc {base['val_accuracy']:.4f} ± {base['val_accuracy_std']:.4f} "
              f"on {base['val_pairs']} pairs (same arch and seed, no training)", flush=True)
        for name in names:
            loss = name.split("-")[0]
            opts = dict(LOSSES[name])
            cfg = PretrainConfig(
                data=data, out=Path(tmp) / f"run-{name}", arch="small_cnn", embedding_size=args.embedding_size,
                input_size=args.input_size, center_crop=0.6, arch_kwargs={"width": args.width}, loss=loss,
                loss_kwargs=opts, batch_size=args.pk_identities * args.pk_images, pk_identities=args.pk_identities,
                pk_images=args.pk_images, val_fraction=args.val_fraction, val_max_pairs=args.val_pairs,
                workers=args.workers,
                train=TrainConfig(steps=args.steps, lr=args.lr, schedule="cosine",
                                  warmup_steps=min(10, args.steps // 5), log_every=max(1, args.steps // 10),
                                  seed=args.seed),
            )
            seed_everything(args.seed)
            t0 = time.perf_counter()
            s = pretrain(cfg, torch.device("cpu"))
            rec = {
                "loss": name, "options": s["loss_options"], "steps": s["steps"], "epochs": s["epochs"],
                "seconds": round(time.perf_counter() - t0, 1), "final_train_loss": s["final_loss"],
                "val_accuracy": s.get("val_accuracy"), "val_accuracy_std": s.get("val_accuracy_std"),
                "val_pairs": s.get("val_pairs"), "val_identities": s["val_identities"],
                "train_identities": s["train_identities"],
            }
            results.append(rec)
            print(f"{name:>18}: val acc {rec['val_accuracy']:.4f} ± {rec['val_accuracy_std']:.4f} on "
                  f"{rec['val_pairs']} pairs, final loss {rec['final_train_loss']:.4f}, {rec['seconds']} s",
                  flush=True)

    setup = {
        "data": f"LFW-a ({LFW}), identities with ≥ {args.min_images} photos"
                + (f", first {args.max_identities}" if args.max_identities else ""),
        "identities": n_ids, "images": n_images, "arch": "small_cnn", "width": args.width,
        "input_size": args.input_size, "center_crop": 0.6, "embedding_size": args.embedding_size,
        "steps": args.steps, "batch": f"{args.pk_identities}x{args.pk_images}", "lr": args.lr,
        "optimizer": "sgd", "schedule": "cosine", "val_fraction": args.val_fraction, "val_max_pairs": args.val_pairs,
        "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    rows = "\n".join(
        f"| {r['loss']} | {', '.join(f'{k}={v}' for k, v in r['options'].items())} | "
        f"{r['val_accuracy']:.4f} ± {r['val_accuracy_std']:.4f} | {r['val_pairs']} | "
        f"{'–' if r['final_train_loss'] is None else format(r['final_train_loss'], '.4f')} | {r['seconds']} |"
        for r in results)
    md = (f"small_cnn (width {args.width}, {args.embedding_size}-d) at {args.input_size} px, center crop 0.6, on "
          f"{n_ids} LFW-a identities with ≥ {args.min_images} photos ({n_images} images); every loss gets "
          f"{args.steps} SGD steps of {args.pk_identities}×{args.pk_images} P×K batches (lr {args.lr}, cosine), "
          f"seed {args.seed}. Validation: 10-fold verification accuracy on pairs of the "
          f"{results[0]['val_identities'] if results else '?'} held-out identities.\n\n"
          "The `untrained` row is the same network before any step: the level to beat.\n\n"
          "| loss | options | val accuracy | val pairs | final train loss | seconds |\n"
          "|---|---|---|---|---|---|\n" + rows + "\n")
    path = write_results("loss_bench", {"setup": setup, "results": results}, md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
