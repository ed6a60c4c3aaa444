"""The backbone zoo: registry, parameter counts of the reference architectures, shapes, artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lblctl.core.errors import LblError
from lblctl.data.faces import Preprocess
from lblctl.models.backbones import count_parameters, create_backbone, default_input_size, list_backbones
from lblctl.models.checkpoint import load_backbone, save_backbone


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_lists_the_zoo() -> None:
    assert set(list_backbones()) >= {"small_cnn", "iresnet18", "iresnet34", "iresnet50", "iresnet100",
                                     "mobilefacenet"}
    assert default_input_size("iresnet50") == 112 and default_input_size("mobilefacenet") == 112
    with pytest.raises(LblError, match="--arch resnet50: unknown backbone"):
        create_backbone("resnet50")
    with pytest.raises(LblError, match="--input-size 100"):
        create_backbone("mobilefacenet", input_size=100)
    with pytest.raises(LblError, match="--input-size 120"):
        create_backbone("iresnet34", input_size=120)


# Reference figures (all parameters, 112×112 input): arcface_torch's iresnet at 512-d, and the
# MobileFaceNet paper (Chen et al. 2018: 0.99M parameters at 128-d).
@pytest.mark.parametrize("arch,dim,expect", [
    ("iresnet50", 512, 43.6e6),
    ("iresnet100", 512, 65.2e6),
    ("iresnet34", 512, 34.1e6),
    ("iresnet18", 512, 24.0e6),
    ("mobilefacenet", 128, 0.99e6),
    ("mobilefacenet", 512, 1.20e6),
])
def test_parameter_counts_match_the_references(arch: str, dim: int, expect: float) -> None:
    n = count_parameters(create_backbone(arch, dim))
    assert n == pytest.approx(expect, rel=0.015), n


def test_iresnet50_exact_layout() -> None:
    model = create_backbone("iresnet50", 512)
    assert count_parameters(model) == 43_590_848
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 14, 3]
    assert model.fc.in_features == 512 * 7 * 7 and not model.features.weight.requires_grad


def test_mobilefacenet_has_a_gdc_head() -> None:
    model = create_backbone("mobilefacenet", 128)
    dw = model.features.layers[0][0]
    assert isinstance(dw, torch.nn.Conv2d) and dw.kernel_size == (7, 7) and dw.groups == 512
    assert count_parameters(create_backbone("mobilefacenet", 512, scale=2)) > 2e6  # arcface_torch's "mbf"


@pytest.mark.parametrize("arch,size", [("small_cnn", 32), ("small_cnn", 48), ("mobilefacenet", 112),
                                       ("mobilefacenet", 64), ("iresnet18", 32)])
def test_forward_shapes(arch: str, size: int) -> None:
    torch.manual_seed(0)
    kw = {"width": 8} if arch == "small_cnn" else {}
    model = create_backbone(arch, 24, size, **kw).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 24) and torch.isfinite(out).all()


def test_mobilefacenet_roundtrips_through_backbone_pt(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_backbone("mobilefacenet", 64, 64).eval()
    pre = Preprocess(64, 1.0)
    fp = save_backbone(tmp_path / "backbone.pt", model, arch="mobilefacenet", embedding_size=64, preprocess=pre)
    bb = load_backbone(tmp_path / "backbone.pt", torch.device("cpu"))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(x), dim=1)
    assert bb.fingerprint == fp and bb.arch == "mobilefacenet"
    assert torch.allclose(bb.embed(x), ref, atol=1e-5)
