"""The one features reader: names grouped by value (never by hash alone), checks before any work."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import lblctl.core.strings as strings
from lblctl.core.errors import LblError
from lblctl.core.store import PrototypeStore
from lblctl.core.strings import StringArray
from lblctl.data.features import FeaturesFile
from lblctl.stages.imprint import ImprintConfig, run


def _write(path: Path, names: list[str], feats: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["identities"] = np.array(names, dtype=object).astype(h5py.string_dtype())
    return path


@pytest.fixture()
def every_hash_collides(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-bit hash under which all names collide: what a rare real collision does, made certain."""
    monkeypatch.setattr(strings, "_hash64", lambda data: 42)


def test_colliding_names_stay_apart(tmp_path: Path, every_hash_collides: None) -> None:
    names = ["bob", "ann", "bob", "cy", "ann"]
    first, inverse = StringArray.from_iter(names).unique()
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    feats = np.eye(5, 4, dtype=np.float32)[[0, 1, 2, 3, 1]]
    with FeaturesFile(_write(tmp_path / "f.h5", names, feats)) as f:
        idents, group = f.identities()
        assert list(idents) == ["bob", "ann", "cy"] and group.tolist() == [0, 1, 0, 2, 1]
        assert f.rows_in(StringArray.from_iter(["cy", "bob", "zed"])).tolist() == [1, -1, 1, 0, -1]
    run(ImprintConfig(out=tmp_path / "store", features=tmp_path / "f.h5"), "cpu")
    with PrototypeStore.open(tmp_path / "store", expect_embedding_size=4) as s:
        assert list(s.names) == ["bob", "ann", "cy"]
        bob = np.array([1, 0, 1, 0]) / np.sqrt(2)
        np.testing.assert_allclose(s.gather([0])[0], bob, atol=1e-6)
        np.testing.assert_allclose(s.gather([2])[0], [0, 0, 0, 1], atol=1e-6)


def test_bad_files_stop_before_work(tmp_path: Path) -> None:
    with pytest.raises(LblError, match="no such file"):
        FeaturesFile(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(LblError, match="not an HDF5 file"):
        FeaturesFile(tmp_path / "text.h5")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["vectors"] = np.zeros((2, 3))
    with pytest.raises(LblError, match="needs datasets 'features'.*found vectors"):
        FeaturesFile(tmp_path / "v.h5")
    _write(tmp_path / "short.h5", ["a"], np.zeros((2, 3), np.float32))
    with pytest.raises(LblError, match=r"'identities' \(1,\)"):
        FeaturesFile(tmp_path / "short.h5")
    _write(tmp_path / "d.h5", ["a", "b"], np.zeros((2, 3), np.float32))
    with pytest.raises(LblError, match="the store needs M×8"):
        FeaturesFile(tmp_path / "d.h5", embedding_size=8)
