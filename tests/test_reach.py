"""Reach: squeeze-excitation gates stay in the default scope, and timm's zoo is in the registry."""

import pytest
import torch

import regprune
from regprune import UserError, create_model, list_models
from regprune.counting import count_macs
from regprune.graph import analyze


def test_squeeze_excitation_gate_is_not_a_residual_stream():
    m = create_model("torchvision.mobilenet_v3_small", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    g = analyze(m, x)
    gates = [grp for grp in g.groups.values() if grp.kind == "gate"]
    assert gates and all(grp.in_scope for grp in gates)  # expand/depthwise channels with an SE gate
    assert any(grp.kind == "residual stream" and not grp.in_scope for grp in g.groups.values())
    res = regprune.prune(m, x, speedup=2.0)
    real = count_macs(m, x) / count_macs(res.model, x)
    assert abs(real - 2.0) / 2.0 <= 0.02 and res.verification["verified"]


def test_timm_models_are_listed_and_built_without_downloads():
    names = list_models("timm.*")
    assert "timm.resnet18" in names and len(names) > 500
    assert "timm.resnet18" not in list_models("torchvision.*")
    m = create_model("timm.resnet18", num_classes=7, in_channels=1)
    assert m.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 7)
    assert m.regprune_arch["name"] == "timm.resnet18"


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,size", [
    ("timm.resnet18", {}, 32),
    ("timm.efficientnet_b0", {}, 32),
    ("timm.mobilenetv3_small_100", {}, 32),
    ("timm.convnext_atto", {}, 32),
    ("timm.regnetx_002", {}, 32),
    ("timm.vit_tiny_patch16_224", {"img_size": 32}, 32),
])
def test_timm_families_prune_verified_or_refused(name, kw, size, tmp_path):
    m = create_model(name, num_classes=10, **kw)
    x = torch.randn(1, 3, size, size)
    try:
        res = regprune.prune(m, x, speedup=1.5)
    except UserError as exc:  # refused: one line, with the reason
        assert "\n" not in str(exc)
        return
    assert res.verification["verified"] and res.model.eval()(x).shape == (1, 10)
    path = regprune.save(res.model, tmp_path / "m.safetensors")
    again, _ = regprune.load(path)  # rebuilt by its registry name
    assert torch.allclose(again.eval()(x), res.model.eval()(x), atol=1e-5)
