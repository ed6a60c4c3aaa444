"""Stages as library functions: one Summary type, P×K batch rules in the pretrain stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lblctl.core.errors import LblError
from lblctl.core.summary import Summary
from lblctl.stages.pretrain import PretrainConfig, batch_size_of


def test_summary_reads_like_its_figures() -> None:
    s = Summary("eval", {"eer": 0.1, "problems": {"count": 0}}, table="a table", notes=["report: x"])
    assert s["eer"] == 0.1 and dict(s) == {"eer": 0.1, "problems": {"count": 0}} and s.get("top1") is None
    assert json.loads(json.dumps(dict(s))) == s.figures and s == {"eer": 0.1, "problems": {"count": 0}}
    assert s.exit_code == 0 and s.table == "a table"


@pytest.mark.parametrize("p,k,b,expect", [(0, 0, 0, 128), (0, 0, 32, 32), (16, 4, 0, 64), (16, 4, 64, 64)])
def test_pk_batch_size(p: int, k: int, b: int, expect: int) -> None:
    cfg = PretrainConfig(data=Path("d"), out=Path("o"), batch_size=b, pk_identities=p, pk_images=k)
    assert batch_size_of(cfg) == expect


def test_pk_batch_size_refusals() -> None:
    with pytest.raises(LblError, match="--batch-size 32: with --pk-identities 16 --pk-images 4 a batch holds 64"):
        batch_size_of(PretrainConfig(data=Path("d"), out=Path("o"), batch_size=32, pk_identities=16, pk_images=4))
    with pytest.raises(LblError, match="--batch-size 1: need at least 2"):
        batch_size_of(PretrainConfig(data=Path("d"), out=Path("o"), batch_size=1))
