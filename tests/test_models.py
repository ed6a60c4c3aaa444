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


def iresnet_parameters(layers: list[int], dim: int = 512, width: int = 64, size: int = 112) -> int:
    """All parameters of arcface_torch's IResNet, counted by hand from its layer shapes.

    Stem: 3×3 conv 3→w, BN, PReLU. Stage i (planes p = w·2^i, stride 2): each IBasicBlock is
    BN(c_in), 3×3 conv c_in→p, BN(p), PReLU(p), 3×3 conv p→p, BN(p); the first block adds a 1×1
    conv c_in→p + BN(p) shortcut. Head: BN(8w), Linear(8w·(size/16)² → dim) with bias, BN1d(dim).
    A BN has 2 parameters per channel (weight, bias), a PReLU 1.
    """
    n = 3 * width * 9 + 2 * width + width
    c_in = width
    for i, blocks in enumerate(layers):
        p = width * 2 ** i
        for b in range(blocks):
            c = c_in if b == 0 else p
            n += 2 * c + 9 * c * p + 2 * p + p + 9 * p * p + 2 * p
            if b == 0:
                n += c * p + 2 * p
        c_in = p
    return n + 2 * 8 * width + 8 * width * (size // 16) ** 2 * dim + dim + 2 * dim


@pytest.mark.parametrize("arch,layers", [("iresnet18", [2, 2, 2, 2]), ("iresnet34", [3, 4, 6, 3]),
                                         ("iresnet50", [3, 4, 14, 3]), ("iresnet100", [3, 13, 30, 3])])
def test_iresnet_parameter_count_from_layer_shapes(arch: str, layers: list[int]) -> None:
    model = create_backbone(arch, 512)
    assert count_parameters(model) == iresnet_parameters(layers)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == layers
    assert model.fc.in_features == 512 * 7 * 7 and not model.features.weight.requires_grad
    assert count_parameters(create_backbone(arch, 128, 64)) == iresnet_parameters(layers, 128, size=64)


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
