"""Shared fixtures: small slices of the real faces in ../shared/data (never mocks of our parts)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LBLCTL_SHARED", REPO.parent / "shared"))
LFW = SHARED / "data" / "lfw"
ORL = SHARED / "data" / "orl"
YALEB = SHARED / "data" / "yaleb"
MODELS = SHARED / "models"
DEMO = REPO / "examples" / "data" / "faces"


def pytest_configure(config: pytest.Config) -> None:
    if not LFW.is_dir():
        raise pytest.UsageError(f"the shared face data is missing at {SHARED} (set LBLCTL_SHARED)")


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


@pytest.fixture()
def lfw_slice(tmp_path: Path) -> Path:
    """12 real LFW identities × 4 photos, as identity folders in a writable temp dir."""
    return copy_slice(tmp_path / "faces", lfw_identities(4, 12), 4)
