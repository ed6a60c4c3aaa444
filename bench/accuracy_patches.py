"""Diagnostic train-dp runs (head-only, LFW split of bench/accuracy_bench.py) with library-level patches that
are NOT options of lblctl: what made queues-only DP collapse (issue 17). One JSON line per run on stdout.

    nice -n 19 python bench/accuracy_patches.py '{"q": 1}'          # only the first q queue columns, rest random
    nice -n 19 python bench/accuracy_patches.py '{"no_promote": true}'   # queues never promoted
    nice -n 19 python bench/accuracy_patches.py '{"photo_rows_only": true}'  # only rows with photos updated
    nice -n 19 python bench/accuracy_patches.py '{"q": 1, "logq": true}'  # + log(absent / random) on random rows

Other knobs: head, K, S (32), batch (64), steps (300), head_lr, s, m, seed, overlap, clip. Every run starts from
the imprint-all store; results of the README's runs: bench/results/accuracy_patches.jsonl. They ran before
--hard-fraction existed (queues only), so "hard_fraction" defaults to 1 here.
"""
import collections
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_bench as ab  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lblctl.core import queues as qmod  # noqa: E402
from lblctl.models import losses as losses_mod  # noqa: E402
from lblctl.stages.train_dp import TrainDPConfig, train_dp  # noqa: E402
from lblctl.train import dp as dpmod  # noqa: E402
from lblctl.train import dp_head  # noqa: E402
from lblctl.train.engine import TrainConfig  # noqa: E402


def patch_photo_rows_only() -> None:
    """Only the rows whose class has photos in the batch get a gradient (queue/random members stay put)."""
    fw0, step0, mask = dp_head.DPHead.forward, dp_head.HeadSGD.step, {}

    def fw(self, emb, labels):  # noqa: ANN001, ANN202
        m = torch.zeros(self.weight.shape[0], 1)
        m[labels.unique()] = 1.0
        mask["m"] = m
        return fw0(self, emb, labels)

    def step(self, closure=None):  # noqa: ANN001, ANN202
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(mask["m"])
        return step0(self, closure)

    dp_head.DPHead.forward, dp_head.HeadSGD.step = fw, step


def patch_queue_columns(q: int) -> None:
    """Only the first q columns of each sampled identity's dominant queue; the sampler tops up with random rows."""
    sel0 = dpmod.DominantSampler.select

    def sel(self, step, dominant_of):  # noqa: ANN001, ANN202
        return sel0(self, step, (lambda r: np.asarray(dominant_of(r))[:, :q]) if dominant_of else None)

    dpmod.DominantSampler.select = sel


def patch_logq() -> None:
    """Sampled-softmax correction: each random (non-queue) row's logit + log(absent rows / random rows), so the
    random rows stand for all the rows not on the device. Hard rows counted as the leading run of queue members
    after the S sampled identities (approximate)."""
    offsets, current = collections.OrderedDict(), {}
    sel0, load0, logits0 = dpmod.DominantSampler.select, dp_head.DPHead.load, losses_mod._MarginHead.margin_logits

    def sel(self, step, dominant_of):  # noqa: ANN001, ANN202
        rows = sel0(self, step, dominant_of)
        s = self.sampled
        nh = 0
        if self.mode == "dp" and dominant_of is not None:
            hard = set(np.asarray(dominant_of(rows[:s])).reshape(-1).tolist())
            for r in rows[s:].tolist():
                if r not in hard:
                    break
                nh += 1
        nr = len(rows) - s - nh
        off = np.zeros(len(rows), dtype=np.float32)
        if nr > 0:
            off[s + nh:] = np.log((self.num_rows - s - nh) / nr)
        offsets[int(step)] = torch.from_numpy(off)
        return rows

    def load(self, vectors, momentum):  # noqa: ANN001, ANN202
        current["o"] = offsets.pop(min(offsets))  # steps are loaded in order
        return load0(self, vectors, momentum)

    def logits(self, cosine, labels):  # noqa: ANN001, ANN202
        return logits0(self, cosine, labels) + current["o"][None, :]

    dpmod.DominantSampler.select, dp_head.DPHead.load = sel, load
    losses_mod._MarginHead.margin_logits = logits


def main() -> None:
    knobs = json.loads(sys.argv[1])
    bb = ab.pretrain_backbone(ab.TMP / "lfw", 4)
    ds = ab.Dataset("lfw", bb)
    if knobs.get("no_promote"):
        qmod.Queues.promote = lambda self, *a, **k: 0
    if knobs.get("photo_rows_only"):
        patch_photo_rows_only()
    if knobs.get("q") is not None:
        patch_queue_columns(knobs["q"])
    if knobs.get("logq"):
        patch_logq()
    run = ab.TMP / "lib" / str(abs(hash(sys.argv[1])))
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    t0 = time.time()
    train = TrainConfig(steps=knobs.get("steps", 300), lr=0.01, weight_decay=5e-4, checkpoint_every=0,
                        seed=knobs.get("seed", 0), grad_clip=knobs.get("clip", 5.0))
    cfg = TrainDPConfig(store=ds.stores[knobs.get("start", "all")], out=run / "out", features=ds.features,
                        out_store=run / "store", head=knobs.get("head", "dp"),
                        hard_fraction=knobs.get("hard_fraction", 1.0), classes=knobs.get("K", 128),
                        sampled=knobs.get("S", 32), batch_size=knobs.get("batch", 64),
                        overlap=knobs.get("overlap", True), head_lr=knobs.get("head_lr"),
                        loss_kwargs={"s": knobs.get("s"), "m": knobs.get("m")}, train=train)
    r = train_dp(cfg, torch.device("cpu"))
    res = ab.closed_set(bb, run / "store", ds.split["probes"])
    print(json.dumps({**knobs, **res, "s": round(time.time() - t0, 1), "loss": r.get("final_loss"),
                      "load": ab.loadavg()}))
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
