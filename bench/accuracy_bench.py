"""Accuracy of train-dp against the baselines a user tries first, on real faces.

    nice -n 10 python bench/accuracy_bench.py                       # LFW + ORL + Yale B, 3 seeds
    nice -n 10 python bench/accuracy_bench.py --datasets lfw --seeds 0

Split of ../shared/data/lfw (fixed, seed 0): 300 identities with 3–30 photos are the ID/spot set
(ID photo = first file, one or two training spot photos, up to 4 more held out as probes); 1,000
single-photo identities are distractor prototypes (imprinted from their only photo, never
trained on); 100 other identities with ≥ 2 photos are the open-set verification group (never
trained on by anything); every remaining identity with ≥ 2 photos pretrains the backbone
(small_cnn, 48 px, cached under bench/results/tmp/ so reruns reuse it). ORL and Yale B are
framed like LFW-a (face in the central 60 %) and split the same way (ID + 2 spots, rest probes).

Baselines, all with the same backbone, photos and number of steps:
imprint-ID, imprint-all (ID + training spots averaged), train-dp frozen backbone (head-only over
precomputed features), train-dp fine-tuning the backbone (the README's command), --head random,
--head full. Closed set: top-1/top-5 of held-out spot photos against all prototypes.
Open set: TAR@FAR 1e-2 / 1e-3 and AUC on the verification group, with the backbone before and
after train-dp. Every stage runs through the CLI (``lblctl ... --json``).

Results: bench/results/accuracy.json and accuracy.md (with the machine and load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LBLCTL_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
TMP = RESULTS / "tmp" / "accuracy"
IMG = (".jpg", ".jpeg", ".png", ".pgm", ".bmp")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" tid")[0].strip()


def cli(*args: str) -> dict:
    """One lblctl stage through its CLI, summary as JSON."""
    cmd = [sys.executable, "-m", "lblctl.cli", *args, "--json", "--quiet", "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"lblctl {' '.join(args)} failed: {res.stderr.strip()[-800:]}")
    return json.loads(res.stdout)


def _files(folder: Path) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src, dst)


# ----------------------------------------------------------------------------- splits


def lfw_split(root: Path, n_ids: int = 300, n_distractors: int = 1000, n_verify: int = 100) -> dict:
    """The fixed LFW split (see the module docstring); writes symlink folders under ``root``."""
    lfw = DATA / "lfw"
    names = sorted(os.listdir(lfw))
    files = {n: _files(lfw / n) for n in names}
    rng = np.random.default_rng(0)
    mid = [n for n in names if 3 <= len(files[n]) <= 30]
    ids = sorted(rng.choice(mid, n_ids, replace=False).tolist())
    single = [n for n in names if len(files[n]) == 1]
    distractors = sorted(rng.choice(single, n_distractors, replace=False).tolist())
    rest = [n for n in names if len(files[n]) >= 2 and n not in set(ids) and len(files[n]) <= 30]
    verify = sorted(rng.choice(rest, n_verify, replace=False).tolist())
    used = set(ids) | set(verify)
    pretrain = [n for n in names if len(files[n]) >= 2 and n not in used]
    split = {"train": {}, "probes": [], "verify": {}, "distractors": distractors, "pretrain": pretrain}
    for n in ids:
        f = files[n]
        spots = 1 if len(f) == 3 else 2
        split["train"][n] = [str(lfw / n / x) for x in f[: 1 + spots]]
        split["probes"] += [(n, str(lfw / n / x)) for x in f[1 + spots : 1 + spots + 4]]
    for n in distractors:
        split["train"][n] = [str(lfw / n / files[n][0])]
    for n in verify:
        split["verify"][n] = [str(lfw / n / x) for x in files[n][:6]]
    if not (root / "pretrain").exists():
        for n in pretrain:
            for x in files[n]:
                _link(lfw / n / x, root / "pretrain_tmp" / n / x)
        (root / "pretrain_tmp").rename(root / "pretrain")
    return split


def framed(src: Path, dst: Path) -> None:
    """A tightly cropped face (ORL, Yale B) placed like LFW-a: face in the central 60 % of 250×250."""
    from PIL import Image

    if dst.exists():
        return
    im = Image.open(src).convert("L")
    h = 150
    w = round(im.width * h / im.height)
    canvas = Image.new("L", (250, 250), 0)
    canvas.paste(im.resize((w, h), Image.BILINEAR), ((250 - w) // 2, 50))
    dst.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(dst)


def small_split(name: str, root: Path) -> dict:
    """ORL / Yale B: ID photo + 2 spot photos per subject for training, every other photo a probe."""
    src = DATA / name
    split: dict = {"train": {}, "probes": [], "verify": {}, "distractors": [], "pretrain": []}
    for subject in sorted(os.listdir(src)):
        if not (src / subject).is_dir():
            continue
        f = _files(src / subject)
        if name == "orl":
            f = sorted(f, key=lambda x: int(x.split(".")[0]))
        else:  # Yale B: the frontal-lit frame is the ID photo
            front = [x for x in f if "A+000E+00" in x]
            f = front + [x for x in f if x not in front]
        out = []
        for x in f:
            dst = root / "framed" / subject / (Path(x).stem + ".png")
            framed(src / subject / x, dst)
            out.append(str(dst))
        split["train"][subject] = out[:3]
        split["probes"] += [(subject, p) for p in out[3:]]
    return split


def write_folder(folder: Path, train: dict[str, list[str]], only: set[str] | None = None,
                 first_only: bool = False) -> Path:
    """Identity folders (symlinks); the first photo is named ``id_…`` so lblctl takes it as the ID photo.
    Made once (the split is fixed): benches running side by side share them while they train."""
    done = folder.with_name(folder.name + ".done")
    if done.exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    for n, paths in train.items():
        if only is not None and n not in only:
            continue
        for i, p in enumerate(paths[:1] if first_only else paths):
            stem = ("id_" if i == 0 else f"spot{i}_") + Path(p).name
            _link(Path(p), folder / n / stem)
    done.touch()
    return folder


# ----------------------------------------------------------------------------- metrics


_EMBEDDED: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}


def embed(backbone: Path, paths: list[str]) -> np.ndarray:
    """Unit embeddings of ``paths`` (the library's own embedding path, as imprint/eval use it), memoised
    for the starting backbone, which every head-only run shares."""
    key = (str(backbone), tuple(paths))
    if key in _EMBEDDED:
        return _EMBEDDED[key]
    import torch

    from lblctl.models.checkpoint import load_backbone
    from lblctl.models.embed import embed_paths

    bb = load_backbone(backbone, torch.device("cpu"))
    vectors = embed_paths(bb, paths, batch_size=128).vectors
    if "runs" not in Path(backbone).parts:
        _EMBEDDED[key] = vectors
    return vectors


def store_rows(store: Path) -> tuple[np.ndarray, list[str]]:
    from lblctl.core.store import PrototypeStore

    with PrototypeStore.open(store) as s:
        return np.concatenate([c for _, c in s.iter_chunks()]), list(s.names)


def closed_set(backbone: Path, store: Path, probes: list[tuple[str, str]]) -> dict:
    protos, names = store_rows(store)
    emb = embed(backbone, [p for _, p in probes])
    where = {n: i for i, n in enumerate(names)}
    truth = np.array([where[n] for n, _ in probes])
    top = np.argsort(-(emb @ protos.T), axis=1)[:, :5]
    return {"top1": float((top[:, 0] == truth).mean()), "top5": float((top == truth[:, None]).any(1).mean())}


def open_set(backbone: Path, verify: dict[str, list[str]]) -> dict:
    """All same pairs and all different pairs of the verification group's photos."""
    paths, owner = [], []
    for i, (_, ps) in enumerate(sorted(verify.items())):
        paths += ps
        owner += [i] * len(ps)
    emb = embed(backbone, paths)
    owner_a = np.array(owner)
    sim = emb @ emb.T
    iu = np.triu_indices(len(paths), 1)
    scores, same = sim[iu], (owner_a[:, None] == owner_a[None, :])[iu]
    pos, neg = np.sort(scores[same]), np.sort(scores[~same])[::-1]
    out = {"pairs_same": int(same.sum()), "pairs_different": int((~same).sum())}
    for far in (1e-2, 1e-3):
        thr = neg[max(0, int(np.floor(far * len(neg))) - 1)] if len(neg) else 1.0
        out[f"tar@far{far:g}"] = float((pos > thr).mean())
    # AUC = P(score_same > score_different), ties count half
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]), kind="stable"), kind="stable") + 1
    out["auc"] = float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
    return out


# ----------------------------------------------------------------------------- runs


def write_features(backbone: Path, folder: Path, out: Path) -> Path:
    """Embeddings of every training photo (head-only train-dp: the frozen backbone, computed once)."""
    import h5py

    if out.exists():
        return out
    paths, names = [], []
    for n in sorted(os.listdir(folder)):
        for f in sorted(os.listdir(folder / n)):
            paths.append(str(folder / n / f))
            names.append(n)
    emb = embed(backbone, paths)
    tmp = out.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f["features"] = emb.astype(np.float32)
        f["identities"] = np.array(names, dtype=object).astype(h5py.string_dtype())
    tmp.rename(out)
    return out


class Dataset:
    """One data set's split, folders, backbone, imprinted stores and features (all cached)."""

    def __init__(self, name: str, backbone: Path) -> None:
        self.name = name
        self.root = TMP / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.split = lfw_split(self.root) if name == "lfw" else small_split(name, self.root)
        self.backbone = backbone
        self.ids = write_folder(self.root / "ids", self.split["train"])
        self.trained = [n for n, p in self.split["train"].items() if len(p) > 1]
        self.stores = {}
        for photos in ("id", "all"):
            store = self.root / f"store_{photos}"
            if not (store / "queues.h5").exists():
                shutil.rmtree(store, ignore_errors=True)
                cli("imprint", "--data", str(self.ids), "--backbone", str(backbone), "--out", str(store),
                    "--photos", photos, "--workers", "1")
                cli("build-index", "--store", str(store), "--candidates", "50", "--dominant", "20")
            self.stores[photos] = store
        # train-dp reads the photos of the trained identities only: the single-photo distractors stay bare
        # imprints, in the store as prototypes (negatives, queue members), never sampled as classes
        self.train_ids = write_folder(self.root / "train_ids", self.split["train"], only=set(self.trained))
        self.features = write_features(backbone, self.train_ids, self.root / "features_trained.h5")

    def train(self, tag: str, seed: int, mode: str, start: str, args: list[str]) -> dict:
        """One train-dp run (``mode`` images = fine-tune or --freeze-backbone; features = head-only)."""
        run = self.root / "runs" / f"{tag}_s{seed}_{os.getpid()}"  # benches may run side by side
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        src = ["--data", str(self.train_ids), "--backbone", str(self.backbone)] if mode == "images" else \
              ["--features", str(self.features)]
        t0 = time.perf_counter()
        r = cli("train-dp", *src, "--store", str(self.stores[start]), "--out-store", str(run / "store"),
                "--out", str(run / "out"), "--seed", str(seed), "--checkpoint-every", "0", "--workers", "1", *args)
        seconds = time.perf_counter() - t0
        backbone = run / "out" if (run / "out" / "backbone.pt").exists() else self.backbone
        res = {"seconds": round(seconds, 1), "final_loss": r.get("final_loss"), "steps": r.get("steps"),
               "queue_changes": r.get("queue_changes"), **closed_set(backbone, run / "store", self.split["probes"])}
        if self.split["verify"] and backbone != self.backbone:
            res["open_set"] = open_set(backbone, self.split["verify"])
        shutil.rmtree(run, ignore_errors=True)
        return res


def pretrain_backbone(root: Path, epochs: int) -> Path:
    """small_cnn 48 px on the pretraining identities (disjoint from every evaluated one), cached."""
    run = root / f"backbone_e{epochs}"
    if not (run / "backbone.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        r = cli("pretrain", "--data", str(root / "pretrain"), "--out", str(run), "--input-size", "48",
                "--center-crop", "0.6", "--embedding-size", "128", "--epochs", str(epochs), "--batch-size", "128",
                "--warmup-steps", "20", "--workers", "1")
        (run / "summary.json").write_text(json.dumps(r))
    return run


def summarise(rows: list[dict]) -> dict:
    """mean ± std (population over seeds) of every numeric figure."""
    out: dict = {"seeds": len(rows)}

    def flat(d: dict, prefix: str = "") -> dict:
        f = {}
        for k, v in d.items():
            if isinstance(v, dict):
                f.update(flat(v, f"{prefix}{k}."))
            elif isinstance(v, (int, float)) and v is not None:
                f[prefix + k] = float(v)
        return f

    flats = [flat(r) for r in rows]
    for k in flats[0]:
        vals = np.array([f[k] for f in flats if k in f])
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std())}
    return out


# ----------------------------------------------------------------------------- the table

# name: (photos: "features" = head-only over the frozen backbone's embeddings | "images" = real photos,
#        starting store, extra train-dp options). Everything else is train-dp's default.
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "dp_frozen": ("features", "id", []),
    "random_frozen": ("features", "id", ["--head", "random"]),
    "full_frozen": ("features", "id", ["--head", "full"]),
    "dp_frozen_old_defaults": ("features", "id", ["--head-lr", "0.01"]),
    "dp_finetune": ("images", "id", []),
    "random_finetune": ("images", "id", ["--head", "random"]),
    "full_finetune": ("images", "id", ["--head", "full"]),
    "dp_finetune_old_defaults": ("images", "id", ["--head-lr", "0.01", "--train-bn"]),
    # the fine-tuning levers (issue 17), one change each against the defaults
    "ft_train_bn": ("images", "id", ["--train-bn"]),
    "ft_lr_0.001": ("images", "id", ["--lr", "0.001"]),
    "ft_lr_0.03": ("images", "id", ["--lr", "0.03"]),
    "ft_warmup_0.5": ("images", "id", ["--head-warmup", "0.5"]),
    "ft_from_all": ("images", "all", []),
    "ft_s32_m0.1": ("images", "id", ["--scale", "32", "--margin", "0.1"]),
    "ft_s16": ("images", "id", ["--scale", "16"]),
    "dp_frozen_from_all": ("features", "all", []),
    "ft_from_all_freeze_bn": ("images", "all", ["--freeze-bn"]),
    "ft_from_all_train_bn": ("images", "all", ["--train-bn"]),
    "random_frozen_from_all": ("features", "all", ["--head", "random"]),
    "full_frozen_from_all": ("features", "all", ["--head", "full"]),
    # issue 17, the queue share: --hard-fraction 1 (every non-sampled slot from the dominant queues) was the
    # behaviour before 0.5 became the default
    "dp_frozen_from_all_hf1": ("features", "all", ["--hard-fraction", "1"]),
    "dp_frozen_from_all_hf0.25": ("features", "all", ["--hard-fraction", "0.25"]),
    "ft_from_all_hf1": ("images", "all", ["--hard-fraction", "1"]),
    "random_ft_from_all": ("images", "all", ["--head", "random"]),
}
LABELS = {
    "imprint_id": "imprint-ID (ID photo only, no training)",
    "imprint_all": "imprint-all (ID + training spots averaged, no training)",
    "dp_frozen": "train-dp, frozen backbone (head-only), defaults",
    "random_frozen": "`--head random`, frozen backbone",
    "full_frozen": "`--head full`, frozen backbone",
    "dp_frozen_old_defaults": "train-dp frozen, old defaults (`--head-lr` = `--lr` 0.01)",
    "dp_frozen_head_lr_0.5": "train-dp frozen, `--head-lr 0.5` (ran while 0.5 was a fixed default; the default "
                             "is now 0.5 × images/256 = 0.031 here: accuracy_small.md)",
    "dp_finetune": "train-dp fine-tuning the backbone, defaults (the README's command)",
    "random_finetune": "`--head random`, fine-tuning",
    "full_finetune": "`--head full`, fine-tuning",
    "dp_finetune_old_defaults": "train-dp fine-tuning, first defaults (`--head-lr` = `--lr` 0.01, `--train-bn`)",
    "ft_train_bn": "fine-tuning, `--train-bn` (the previous default: BatchNorm statistics updated)",
    "ft_lr_0.001": "fine-tuning, backbone `--lr 0.001`",
    "ft_lr_0.03": "fine-tuning, backbone `--lr 0.03`",
    "ft_warmup_0.5": "fine-tuning, `--head-warmup 0.5` (prototypes only for the first half)",
    "ft_from_all": "**train-dp fine-tuned, defaults** (the README's pipeline: from the imprint-all store)",
    "ft_s32_m0.1": "fine-tuning, `-s 32 -m 0.1`",
    "ft_s16": "fine-tuning, `-s 16`",
    "dp_frozen_from_all": "train-dp frozen (head-only), defaults, from the imprint-all store",
    "dp_frozen_from_all_hf1": "train-dp frozen, from imprint-all, `--hard-fraction 1` (queues only: the former "
                              "behaviour)",
    "dp_frozen_from_all_hf0.25": "train-dp frozen, from imprint-all, `--hard-fraction 0.25`",
    "random_frozen_from_all": "`--head random`, frozen, from imprint-all",
    "full_frozen_from_all": "`--head full`, frozen, from imprint-all",
    "ft_from_all_hf1": "fine-tuning from imprint-all, `--hard-fraction 1` (queues only: the former behaviour)",
    "random_ft_from_all": "`--head random`, fine-tuning from imprint-all",
    "ft_from_all_freeze_bn": "fine-tuning from imprint-all, `--freeze-bn`",
    "ft_from_all_train_bn": "fine-tuning from imprint-all, `--train-bn` (= the default)",
}


def size_args(name: str, k: int, s: int) -> tuple[int, int]:
    """ORL / Yale B have ~40 identities: K and S scaled to keep K/N about the same as on LFW."""
    return (k, s) if name == "lfw" else (max(4, k // 16), max(2, s // 16))


def run(args: argparse.Namespace) -> dict:
    TMP.mkdir(parents=True, exist_ok=True)
    lfw_root = TMP / "lfw"
    lfw_split(lfw_root)  # the pretraining folder
    t0 = time.perf_counter()
    backbone = pretrain_backbone(lfw_root, args.epochs)
    pre = json.loads((backbone / "summary.json").read_text()) if (backbone / "summary.json").exists() else {}
    results: dict = {"machine": machine(), "load_before": loadavg(), "seeds": args.seeds, "steps": args.steps,
                     "command": "python bench/accuracy_bench.py " + " ".join(sys.argv[1:]),
                     "finetune_steps": args.finetune_steps, "classes": args.classes, "sampled": args.sampled,
                     "backbone": {"arch": "small_cnn", "input": 48, "embedding": 128, "epochs": args.epochs,
                                  "identities": len(os.listdir(lfw_root / "pretrain")),
                                  "val_accuracy": pre.get("val_accuracy"), "seconds": pre.get("seconds")},
                     "datasets": {}}
    for name in args.datasets:
        ds = Dataset(name, backbone)
        k, s = size_args(name, args.classes, args.sampled)
        n_rows = len(ds.split["train"])
        res: dict = {"command": results["command"], "load_before": loadavg(), "steps": args.steps,
                     "finetune_steps": args.finetune_steps, "seeds": args.seeds,
                     "identities_in_store": n_rows, "trained_identities": len(ds.trained),
                     "probes": len(ds.split["probes"]), "classes": k, "sampled": s, "rows": {}}
        for start in ("id", "all"):
            res["rows"][f"imprint_{start}"] = {"seeds": 1, **{m: {"mean": v, "std": 0.0} for m, v in
                                                 closed_set(backbone, ds.stores[start], ds.split["probes"]).items()}}
        if ds.split["verify"]:
            res["open_set_before"] = open_set(backbone, ds.split["verify"])
        for tag in args.variants:
            mode, start, extra = VARIANTS[tag]
            if mode == "images" and name != "lfw" and not args.finetune_all:
                continue
            steps = args.finetune_steps if mode == "images" else args.steps
            extra = list(extra)
            if args.batch:  # every variant, head-only and fine-tuning: equal photos per step
                extra += ["--batch-size", str(args.batch)]
            elif mode == "images" and args.finetune_batch:
                extra += ["--batch-size", str(args.finetune_batch)]
            elif "full" in tag:  # the same photos per step as dp / random: K classes × 2
                extra += ["--batch-size", str(2 * k)]
            rows = []
            for seed in (args.seeds[:1] if tag in args.one_seed else args.seeds):
                r = ds.train(tag, seed, mode, start, ["--classes", str(k), "--sampled", str(s),
                                                      "--steps", str(steps), *extra])
                r["load"] = loadavg()
                rows.append(r)
                print(name, tag, seed, {x: r[x] for x in ("top1", "top5", "seconds")}, r.get("open_set"), flush=True)
            res["rows"][tag] = {**summarise(rows), "runs": rows, "steps": steps,
                                "command_options": extra}
            res["load_after"] = loadavg()
            save(args.name, {**results, "datasets": {**results["datasets"], name: res}})  # partial results survive
        res["load_after"] = loadavg()
        results["datasets"][name] = res
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["load_after"] = loadavg()
    return results


def pm(cell: dict | None, key: str) -> str:
    if not cell or key not in cell:
        return "–"
    return f"{cell[key]['mean']:.3f} ± {cell[key]['std']:.3f}" if cell.get("seeds", 1) > 1 else \
        f"{cell[key]['mean']:.3f}"


def render(r: dict) -> str:
    b = r["backbone"]
    md = ["# train-dp against the baselines a user tries first", "",
          "Mean ± std over seeds (population std; imprinting is deterministic; a row without ± ran one seed). "
          "Load average: `cat /proc/loadavg` on this shared 2-core box before → after each data set.", "",
          f"Backbone: {b['arch']} {b['input']} px, {b['embedding']}-d, pretrained {b['epochs']} epochs on "
          f"{b['identities']} LFW identities disjoint from every evaluated one (held-out val accuracy "
          f"{b['val_accuracy'] or 0:.3f}).", ""]
    for name, d in r["datasets"].items():
        md += [f"## {name}", "",
               f"{d['trained_identities']} trained identities (ID + 1–2 spot photos) and "
               f"{d['identities_in_store'] - d['trained_identities']} distractor prototypes "
               f"(N = {d['identities_in_store']}); {d['probes']} held-out spot photos as probes; "
               f"K = {d['classes']}, S = {d['sampled']}; head-only runs {d['steps']} steps, "
               f"fine-tuning runs {d['finetune_steps']} steps; seeds {d['seeds']}. Load average "
               f"{d['load_before']} → {d['load_after']}. `{d['command']}`", "",
               "| prototypes | top-1 | top-5 | TAR@FAR 1e-2 | TAR@FAR 1e-3 | AUC | s/run |",
               "|---|---|---|---|---|---|---|"]
        before = d.get("open_set_before")
        for tag, cell in d["rows"].items():
            if "open_set.auc" in cell:
                o = [pm(cell, f"open_set.{x}") for x in ("tar@far0.01", "tar@far0.001", "auc")]
            elif before:
                o = [f"{before[x]:.3f}" for x in ("tar@far0.01", "tar@far0.001", "auc")]
            else:
                o = ["–"] * 3
            secs = f"{cell['seconds']['mean']:.0f}" if "seconds" in cell else "–"
            md.append(f"| {LABELS.get(tag, tag)} | {pm(cell, 'top1')} | {pm(cell, 'top5')} | "
                      f"{' | '.join(o)} | {secs} |")
        if before:
            md += ["", f"Open set: {before['pairs_same']} same / {before['pairs_different']} different pairs "
                   "of 100 identities nobody trained on; rows without fine-tuning keep the starting backbone."]
        md.append("")
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="lfw,orl,yaleb")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=300, help="head-only (frozen backbone) train-dp steps")
    ap.add_argument("--finetune-steps", type=int, default=60, help="train-dp steps that fine-tune the backbone")
    ap.add_argument("--classes", type=int, default=64)
    ap.add_argument("--sampled", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4, help="backbone pretraining epochs (cached)")
    ap.add_argument("--finetune-all", action="store_true", help="also fine-tune on ORL and Yale B")
    ap.add_argument("--one-seed", default="", help="variants to run with the first seed only (CPU budget)")
    ap.add_argument("--finetune-batch", type=int, default=0, help="images per fine-tuning step (0 = K × 2)")
    ap.add_argument("--batch", type=int, default=0, help="images per step of every train-dp run (0: per mode)")
    ap.add_argument("--name", default="accuracy", help="results file stem")
    ap.add_argument("--render-only", action="store_true", help="rewrite NAME.md from NAME.json")
    a = ap.parse_args()
    if a.render_only:
        print(save(a.name, {k: v for k, v in json.loads((RESULTS / f"{a.name}.json").read_text()).items()
                            if k not in ("benchmark",)}))
        return
    a.datasets = a.datasets.split(",")
    a.seeds = [int(x) for x in a.seeds.split(",")]
    a.variants = a.variants.split(",")
    a.one_seed = [x for x in a.one_seed.split(",") if x]
    print(save(a.name, run(a)))


def save(name: str, results: dict) -> str:
    """Write the results file; one file for all data sets, keeping those this run did not redo."""
    previous = RESULTS / f"{name}.json"
    if previous.exists():
        old = json.loads(previous.read_text()).get("datasets", {})
        results = {**results, "datasets": {**{k: v for k, v in old.items() if k not in results["datasets"]},
                                           **results["datasets"]}}
    results.setdefault("load_after", loadavg())
    md = render(results)
    write_results(name, results, md)
    return md


if __name__ == "__main__":
    main()
