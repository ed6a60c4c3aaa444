"""Shared fixtures: small slices of the real faces in ../shared/data (never mocks of our parts).

Without that folder the pure unit tests still run; a test that reads the shared data (directly,
through a fixture or through a helper of its module) is skipped, saying why.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LBLCTL_SHARED", REPO.parent / "shared"))
LFW = SHARED / "data" / "lfw"
ORL = SHARED / "data" / "orl"
YALEB = SHARED / "data" / "yaleb"
MODELS = SHARED / "models"
DEMO = REPO / "examples" / "data" / "faces"


HAVE_SHARED = LFW.is_dir()
NO_SHARED = f"needs the shared face data, missing at {SHARED} (set LBLCTL_SHARED)"
_DATA_NAMES = {"SHARED", "LFW", "ORL", "YALEB", "MODELS", "lfw_identities", "copy_slice", "lfw_slice"}


def _uses_shared(obj: object, namespace: dict, seen: set[int]) -> bool:
    """Whether ``obj``'s source names the shared data: directly, or through a function or a Path
    constant of its module (followed transitively)."""
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return False
    for name in set(re.findall(r"[A-Za-z_]\w*", source)):
        value = inspect.unwrap(namespace[name]) if callable(namespace.get(name)) else namespace.get(name)
        if name in _DATA_NAMES and value is not None:
            return True
        if isinstance(value, Path) and str(value).startswith(str(SHARED)):
            return True
        if inspect.isfunction(value) and value is not obj and _uses_shared(value, vars(inspect.getmodule(value)), seen):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_SHARED:
        return
    skip = pytest.mark.skip(reason=NO_SHARED)
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        seen: set[int] = set()
        fixtures = [d.func for defs in item._fixtureinfo.name2fixturedefs.values() for d in defs]
        if any(_uses_shared(f, vars(inspect.getmodule(f)), seen) for f in [fn, *fixtures]):
            item.add_marker(skip)


def lfw_identities(min_images: int, count: int) -> list[str]:
    """The first ``count`` LFW identities (name order) with at least ``min_images`` photos."""
    names = []
    for name in sorted(os.listdir(LFW)):
        if len(os.listdir(LFW / name)) >= min_images:
            names.append(name)
            if len(names) == count:
                break
    return names


def copy_slice(dest: Path, names: list[str], per_identity: int) -> Path:
    """Copy ``per_identity`` photos of each named LFW identity into ``dest/<name>/``."""
    for name in names:
        (dest / name).mkdir(parents=True, exist_ok=True)
        for f in sorted(os.listdir(LFW / name))[:per_identity]:
            shutil.copyfile(LFW / name / f, dest / name / f)
    return dest


def imprinted_world(root: Path, identities: int = 40, arch: str = "small_cnn",
                    width: int = 8) -> tuple[dict[str, Path], Any]:
    """``identities`` real LFW identities × 3 photos, an untrained backbone ``arch`` (32 px, 32-d), a store
    imprinted from their ID photos (with momentum): the paths, and the imprinted vectors."""
    import torch

    from lblctl.core.store import PrototypeStore
    from lblctl.data.faces import Preprocess, open_face_set
    from lblctl.models.backbones import create_backbone
    from lblctl.models.checkpoint import load_backbone, save_backbone
    from lblctl.models.embed import embed_paths

    faces = copy_slice(root / "faces", lfw_identities(3, identities), 3)
    torch.manual_seed(0)
    model = create_backbone(arch, 32, 32, width=width).eval()
    save_backbone(root / "run" / "backbone.pt", model, arch=arch, embedding_size=32,
                  preprocess=Preprocess(32, 0.6), arch_kwargs={"width": width})
    bb = load_backbone(root / "run")
    index = open_face_set(faces)
    emb = embed_paths(bb, [index.path(r) for r in index.select_images("id")], batch_size=64)
    PrototypeStore.create(root / "store", 32, list(index.names), backbone_fingerprint=bb.fingerprint,
                          vectors=emb.vectors, momentum=True).close()
    paths = {"root": root, "faces": faces, "backbone": root / "run" / "backbone.pt", "store": root / "store"}
    return paths, emb.vectors


@pytest.fixture()
def lfw_slice(tmp_path: Path) -> Path:
    """12 real LFW identities × 4 photos, as identity folders in a writable temp dir."""
    return copy_slice(tmp_path / "faces", lfw_identities(4, 12), 4)


def exact_queues(store_dir: Path, vectors: np.ndarray, cq: int, dq: int) -> None:
    """``queues.h5`` from the exact nearest neighbours of ``vectors`` (what build-index finds, without faiss)."""
    from lblctl.core.queues import Queues

    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :cq]
    w = Queues.create(store_dir / "queues.h5", len(vectors), cq, dq)
    w.write(0, order.astype(np.int32), np.take_along_axis(sims, order, 1).astype(np.float32))
    w.commit()
