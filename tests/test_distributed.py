"""The Partial FC classifier across 2 gloo processes equals the same run in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from lblctl.core.dist import DistEnv, from_environ, shard_range
from lblctl.core.errors import LblError
from lblctl.models.losses import ArcFaceLoss, CosFaceLoss
from lblctl.models.partial_fc import ShardedMarginSoftmax, initial_rows

from .conftest import ORL, copy_slice, lfw_identities

CLASSES, PER_CLASS, SIDE, DIM, STEPS, BATCH = 11, 4, 16, 32, 12, 8


def _faces() -> tuple[torch.Tensor, torch.Tensor]:
    """ORL photos of 11 people, 16×16 grey, flattened: real inputs for a tiny linear backbone."""
    from PIL import Image

    x, y = [], []
    for label in range(CLASSES):
        for k in range(PER_CLASS):
            img = Image.open(ORL / f"s{label + 1}" / f"{k + 1}.pgm").convert("L").resize((SIDE, SIDE))
            x.append(np.asarray(img, np.float32).reshape(-1) / 255.0 - 0.5)
            y.append(label)
    return torch.from_numpy(np.stack(x)), torch.tensor(y)


def _train(env: DistEnv, loss: str) -> dict[str, object]:
    """STEPS SGD steps of a linear backbone (DDP when W > 1) + the sharded head on global batches."""
    torch.manual_seed(0)
    x, y = _faces()
    backbone: nn.Module = nn.Linear(SIDE * SIDE, DIM, bias=False)
    head = ShardedMarginSoftmax(ArcFaceLoss() if loss == "arcface" else CosFaceLoss(), CLASSES, DIM, env, seed=3)
    if env.active:
        backbone = nn.parallel.DistributedDataParallel(backbone)
    opt = torch.optim.SGD([*backbone.parameters(), head.weight], lr=0.003, momentum=0.9)
    order = np.random.default_rng(1).permutation(len(y))
    losses, accs = [], []
    per_rank = BATCH // env.world_size
    for step in range(STEPS):
        batch = np.take(order, np.arange(step * BATCH, (step + 1) * BATCH), mode="wrap")
        mine = batch[env.rank * per_rank:(env.rank + 1) * per_rank]
        out = head(backbone(x[mine]), y[mine])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        accs.append(float(out.accuracy))
    core = backbone.module if env.active else backbone
    return {"losses": losses, "accs": accs, "backbone": core.weight.detach().clone(),
            "rows": (head.start, head.stop), "head": head.weight.detach().clone()}


def _worker(rank: int, world: int, port: int, loss: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_train(DistEnv(rank, world, rank), loss), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss", ["cosface", "arcface"])
def test_two_ranks_equal_one(tmp_path: Path, loss: str) -> None:
    torch.set_num_threads(1)
    ref = _train(DistEnv(), loss)
    mp.spawn(_worker, args=(2, _free_port(), loss, str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in range(2)]
    assert ranks[0]["rows"] == (0, 6) and ranks[1]["rows"] == (6, 11)  # 11 classes: 6 + 5 rows
    for r in ranks:
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["accs"], ref["accs"])
        torch.testing.assert_close(r["backbone"], ref["backbone"], rtol=1e-5, atol=1e-6)
    # the classifier rows see float32 sums in another order (all-reduced over ranks); with ArcFace's s = 64
    # that moves a few entries by ~2e-5 after 12 steps
    torch.testing.assert_close(torch.cat([r["head"] for r in ranks]), ref["head"], rtol=1e-5, atol=5e-5)
    # it learns, so the comparison is not between two runs that do nothing
    assert np.mean(ref["losses"][-4:]) < np.mean(ref["losses"][:4])


def test_one_process_is_plain_cross_entropy() -> None:
    """World 1: the distributed softmax is torch's cross-entropy over s·(margin cosines)."""
    torch.manual_seed(0)
    emb, labels = torch.randn(6, 8, requires_grad=True), torch.tensor([0, 3, 2, 3, 1, 0])
    head = ShardedMarginSoftmax(CosFaceLoss(s=16.0, m=0.3), 4, 8)
    cos = nn.functional.normalize(emb, dim=1) @ nn.functional.normalize(head.weight, dim=1).T
    logits = 16.0 * (cos - 0.3 * nn.functional.one_hot(labels, 4))
    expect = nn.functional.cross_entropy(logits, labels)
    got = head(emb, labels).loss
    torch.testing.assert_close(got, expect)
    g1, = torch.autograd.grad(got, emb)
    g2, = torch.autograd.grad(expect, emb)
    torch.testing.assert_close(g1, g2)


def test_initial_rows_do_not_depend_on_the_split() -> None:
    full = initial_rows(0, 9000, 4, seed=7)
    parts = [initial_rows(*shard_range(9000, r, 3), 4, seed=7) for r in range(3)]
    torch.testing.assert_close(torch.cat(parts), full)
    assert not torch.equal(initial_rows(0, 10, 4, seed=8), full[:10])


def test_shard_range_covers_every_row_once() -> None:
    for n in (0, 1, 7, 10, 1001):
        for w in (1, 2, 3, 8):
            ranges = [shard_range(n, r, w) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


def test_environment() -> None:
    assert from_environ({}) == DistEnv()
    env = from_environ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == DistEnv(1, 4, 1) and env.active and not env.is_main
    with pytest.raises(LblError, match="RANK=4"):
        from_environ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(LblError, match="integers"):
        from_environ({"RANK": "x", "WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------- the real CLI under torchrun
def _torchrun(tmp_path: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
              nproc: int = 2, via_nproc: bool = False) -> subprocess.CompletedProcess:
    data = copy_slice(tmp_path / "faces", lfw_identities(4, 10), 4)
    script = str(Path(__file__).with_name("torchrun_pretrain.py"))
    launcher = ([sys.executable, "-m", "lblctl", "pretrain", f"--nproc={nproc}"] if via_nproc else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script])
    cmd = [*launcher, "--data", str(data), "--out", str(out),
           "--arch", "small_cnn", "--input-size", "32", "--width", "8", "--embedding-size", "32",
           "--batch-size", "8", "--steps", "4", "--checkpoint-every", "2", "--val-fraction", "0.2",
           "--device", "cpu", "--workers", "0", "--quiet", *extra]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=run_env)


@pytest.mark.slow
def test_pretrain_under_torchrun(tmp_path: Path) -> None:
    """2 processes: rank 0 writes the run, every rank its checkpoint shard; another world size is refused."""
    out = tmp_path / "run"
    res = _torchrun(tmp_path, out, "--json", via_nproc=True)  # lblctl pretrain --nproc 2 starts torchrun itself
    assert res.returncode == 0, res.stderr[-2000:]
    summaries = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["steps"] == 4, res.stdout  # one summary per job: rank 0's
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_00000004.pt" in ckpts and "step_00000004.rank1.pt" in ckpts
    main_ckpt = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)
    shard = torch.load(out / "checkpoints" / "step_00000004.rank1.pt", weights_only=True)
    assert main_ckpt["world_size"] == 2
    rows0, rows1 = main_ckpt["modules"]["head"]["weight"], shard["modules"]["head"]["weight"]
    assert rows0.shape[0] + rows1.shape[0] == main_ckpt["extra"]["identities"] - 2  # 8 trained, 2 held out
    # DDP keeps the weights equal; BatchNorm's running statistics are each rank's own (rank 0's are saved)
    weights = [{k: v for k, v in c["modules"]["backbone"].items() if "running" not in k and "batches" not in k}
               for c in (main_ckpt, shard)]
    torch.testing.assert_close(weights[0], weights[1])
    assert (out / "backbone.pt").exists() and (out / "manifest.json").exists()
    logged = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [4]  # one writer: rank 0
    again = _torchrun(tmp_path, out, "--resume", "--steps", "6", nproc=1)
    assert again.returncode != 0  # torchrun's own status when a process fails
    assert "made by 2 processes, now 1" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_failing_rank_ends_the_job(tmp_path: Path) -> None:
    res = _torchrun(tmp_path, tmp_path / "run", env={"LBLCTL_TEST_BREAK_RANK1": "1"})
    assert res.returncode != 0
    lines = [x for x in (res.stdout + res.stderr).splitlines() if x.startswith("error:")]
    assert lines and all("rank 1:" in x and "/nonexistent/photos" in x for x in lines), res.stderr[-2000:]
