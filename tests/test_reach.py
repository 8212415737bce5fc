"""Reach: squeeze-excitation gates stay in the default scope, timm's zoo is in the registry, transformer blocks
(ViT, Swin, MaxViT) are traced and their MLP widths pruned."""

import pytest
import torch
import torch.nn as nn

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


def _small_vits():
    import timm
    import torchvision

    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                              mlp_dim=128, num_classes=10)
    tm = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                          num_heads=2, mlp_ratio=4.0, num_classes=10)
    return [("encoder.layers.encoder_layer_{}.mlp.0", "encoder.layers.encoder_layer_{}.mlp.3", tv),
            ("blocks.{}.mlp.fc1", "blocks.{}.mlp.fc2", tm)]


@pytest.mark.parametrize("case", [0, 1], ids=["torchvision", "timm"])
def test_vit_mlp_hidden_width_is_block_internal_and_prunes_verified(case):
    fc1, fc2, m = _small_vits()[case]
    x = torch.randn(1, 3, 32, 32)
    g = analyze(m, x)
    for i in range(2):
        grp = g.groups[fc1.format(i)]
        assert grp.kind == "block-internal" and grp.in_scope and grp.channels == 128 and not grp.coupled
        assert {(mb.name, mb.side) for mb in grp.members if mb.kind == "Linear"} == {(fc1.format(i), "out"),
                                                                                       (fc2.format(i), "in")}
    for grp in g.groups.values():  # everything else is refused with a reason (residual stream, heads, output)
        assert grp.in_scope == (grp.root in {fc1.format(0), fc1.format(1)}) and (grp.in_scope or grp.reason)
    res = regprune.prune(m, x, ratios="0.5")
    assert res.verification["verified"] and res.verification["modes"] == ["eval", "train"]
    pruned = res.model
    assert pruned.get_submodule(fc1.format(0)).out_features == 64
    assert pruned.get_submodule(fc2.format(1)).in_features == 64
    assert pruned.eval()(x).shape == (1, 10)


def test_groups_are_formed_with_index_mappings_computed_once(monkeypatch):
    import regprune.depgraph as dg
    import regprune.graph as rg

    calls = []
    real = dg._tp_update_index_mapping
    monkeypatch.setattr(dg, "_tp_update_index_mapping", lambda g: (calls.append(1), real(g)))
    m = create_model("torchvision.resnet18", num_classes=10)
    g = rg.GroupGraph(m, torch.randn(1, 3, 32, 32), safety=False)
    assert len(g.groups) > 5 and len(calls) <= 2  # TP's own call in the trace, then one for all groups
    calls.clear()
    with g.mapped_once():
        for root in list(g.groups)[:4]:
            g.tp_group(root, [0])
    assert len(calls) == 0  # the widths did not change since: the mappings are reused


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("torchvision.swin_t", 64), ("torchvision.swin_v2_t", 64),
                                       ("torchvision.swin_s", 64), ("torchvision.maxvit_t", 224)])
def test_window_attention_models_are_analysed_fast(name, size):
    import time

    m = create_model(name, num_classes=10)
    t0 = time.perf_counter()
    g = analyze(m, torch.zeros(1, 3, size, size))
    assert time.perf_counter() - t0 < 60  # minutes per group before the index mappings were bounded
    mlp = [grp for grp in g.groups.values() if grp.root.endswith(("mlp.0", "mlp_layer.1"))]
    assert mlp and all(grp.in_scope and grp.kind == "block-internal" for grp in mlp)
    assert all(grp.in_scope or grp.reason for grp in g.groups.values())


class DeepPatchMerge(nn.Module):
    """Swin's patch merging (2x2 neighbours concatenated on the last dim of a channels-last tensor, LayerNorm,
    reduction) 600 autograd nodes after the layer that writes its input, as in Swin-S/B's 18-block stage 3."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(32)
        self.reduction = nn.Linear(32, 16, bias=False)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x)
        for _ in range(300):
            x = x * 1.0 + 0.0
        x = self.reduction(self.norm(torch.cat([x[..., i::2, j::2, :] for j in (0, 1) for i in (0, 1)], -1)))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean((1, 2)))


def test_channels_last_concat_deep_in_the_graph_is_traced():
    # Torch-Pruning read the concat's dim -1 as 2**64 - 1 and inferred its part widths through the layers before
    # it, giving up past 500 nodes: "TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'"
    m, x = DeepPatchMerge(), torch.randn(1, 8, 8, 3)
    g = analyze(m, x)
    assert g.groups["fc1"].in_scope and g.groups["fc1"].kind == "block-internal"
    res = regprune.prune(m, x, ratios="fc1:0.5")
    assert res.verification["verified"] and res.model.fc1.out_features == 16


def test_torchvision_resnet_built_directly_gets_the_papers_scope():
    """A user's own `torchvision.models.resnet50()` (not from the registry) keeps its stem, as the registry's does."""
    import torchvision

    from regprune.graph import model_family

    assert model_family(torchvision.models.resnet18(num_classes=10)) == "resnet"
    assert model_family(torchvision.models.vgg11(num_classes=10)) == "vgg"
    assert model_family(torchvision.models.mobilenet_v2(num_classes=10)) is None
    x = torch.randn(1, 3, 64, 64)
    direct = regprune.prune(torchvision.models.resnet50(num_classes=10), x, ratios="0.5")
    assert direct.model.conv1.out_channels == 64 and "conv1" not in direct.picks


class _Ghost(nn.Module):
    """A ghost module (GhostNet): a 1x1 conv's output concatenated with a depthwise copy of itself."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        half = cout // 2
        self.primary = nn.Sequential(nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
                                   nn.ReLU())

    def forward(self, x):
        a = self.primary(x)
        return torch.cat([a, self.cheap(a)], 1)


class _GhostNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.g1 = _Ghost(16, 48)
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48))
        self.g2 = _Ghost(48, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.g2(self.dw(self.g1(self.stem(x)))).mean((2, 3)))


def test_ghost_module_plan_matches_the_cut() -> None:
    """Removing channel i of the depthwise conv after a ghost module removes the primary conv's channel i, hence
    the cheap copy's i and the concat's i + half: the group's channels come in 2 blocks, and the planned MACs must
    be the real ones (they were a third off: planned 2x, cut 3x)."""
    torch.manual_seed(0)
    model, x = _GhostNet().eval(), torch.randn(2, 3, 16, 16)
    graph = analyze(model, x)
    assert graph.groups["dw.0"].ch_groups == 2
    result = regprune.prune(model, x, speedup=2.0)
    real = count_macs(model, x) / count_macs(result.model, x)
    assert real == pytest.approx(result.plan.speedup, rel=0.005) and abs(real - 2.0) <= 0.05  # kept MACs within 2%
    assert result.verification["verified"] is True
    assert result.model.dw[0].out_channels == 2 * result.model.g1.primary[0].out_channels


def test_timm_ghostnet_reaches_the_planned_speedup() -> None:
    model = create_model("timm.ghostnet_050", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    result = regprune.prune(model, x, speedup=2.0)
    real = count_macs(model, x) / count_macs(result.model, x)
    assert real == pytest.approx(result.plan.speedup, rel=0.01) and abs(real - 2.0) <= 0.04


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.rnn, self.b = nn.Linear(8, 32), nn.GRU(32, 24, batch_first=True), nn.Linear(24, 10)

    def forward(self, x):
        y, _ = self.rnn(self.a(x))
        return self.b(y)


def test_gru_is_refused_not_traversed_forever() -> None:
    """Read through a GRU, the tracer's offsets go round a cycle and the indices grow without end: the group is
    refused as unsafe, and with nothing else in scope prune says so."""
    with pytest.raises(UserError, match="nothing to prune"):
        regprune.prune(_Recurrent(), torch.randn(4, 6, 8), speedup=1.5)


def test_torch_pruning_warnings_are_not_passed_on() -> None:
    """A parameter used directly in forward (a layer scale) makes Torch-Pruning warn about unwrapped parameters on
    every trace; regprune verifies the cut itself, so none of these reach the user."""
    import warnings

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
            self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) * self.scale)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = regprune.prune(Scaled(), torch.randn(1, 3, 8, 8), ratios="0.5", include_coupled=True)
    assert result.verification["verified"] is True and result.model.scale.shape[0] == 4
    assert not [w for w in caught if "torch_pruning" in w.filename], [str(w.message)[:80] for w in caught]


def test_round_to_that_cannot_round_says_which_groups() -> None:
    import json
    import warnings

    from regprune.jobs.plan import inspect_text

    model, x = create_model("resnet20"), torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = regprune.prune(model, x, speedup=2.0, round_to=1000)
    notes = [str(w.message) for w in caught if "round_to=1000" in str(w.message)]
    assert notes and "layer1.0.conv1 keeps 8" in notes[0], [str(w.message) for w in caught]
    assert result.plan.unrounded and all(w % 1000 for _, w in result.plan.unrounded)
    assert not regprune.prune(model, x, speedup=2.0, round_to=4).plan.unrounded  # widths 16/32/64 round to 4
    text = inspect_text("resnet20", speedup=2.0, round_to=1000)
    assert "note: round_to=1000: 9 group(s) keep a width that is not a multiple" in text
    assert "round_to=1000" in json.loads(inspect_text("resnet20", speedup=2.0, round_to=1000, as_json=True))["note"]


class _EvalCache(nn.Module):
    """Fills a cache in eval mode from a parameter, as timm's LeViT and EfficientFormer do for attention biases:
    a forward with gradients (the tracer's) leaves a tensor with an autograd graph in a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.temperature = nn.Parameter(torch.ones(1))
        self.cache: dict = {}

    def forward(self, x):
        if self.training:
            t = self.temperature * 2
        else:
            t = self.cache.setdefault("t", self.temperature * 2)
        return self.b(torch.relu(self.a(x)) * t)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.cache = {}
        return self


def test_eval_mode_caches_do_not_block_pruning() -> None:
    import copy

    model = _EvalCache().eval()
    result = regprune.prune(model, torch.randn(1, 3, 8, 8), ratios="0.5", include_coupled=True)
    assert result.verification["verified"] is True and result.model.a.out_channels == 4
    copy.deepcopy(model), copy.deepcopy(result.model)  # nothing left holding an autograd graph


class _WidthKeyedScale(nn.Module):
    """Rebuilds a private cache whenever the width it sees changes, in the dtype of the activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2, self._scale = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 16, 1), None

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self._scale is None or self._scale.shape[0] != y.shape[1]:
            self._scale = torch.ones(y.shape[1], dtype=y.dtype) * self.conv.bias.sum() * 0 + 1  # keeps a graph
        return self.conv2(y * self._scale[None, :, None, None])


def test_our_forward_passes_leave_no_trace_in_module_attributes() -> None:
    """Tracing runs with gradients and verification in float64: a private cache filled there used to block every
    cut (a tensor holding its autograd graph cannot be deep-copied) or leave a float64 tensor that broke the
    verified model's next float32 forward."""
    import copy

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), _WidthKeyedScale(), nn.ReLU(),
                        nn.Conv2d(16, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    result = regprune.prune(net, x, ratios="0.5", include_coupled=True)
    assert result.verification["verified"] is True and result.plan.removal.get("2.conv") == 16
    assert net[2]._scale is None and result.model[2]._scale is None  # as they were before
    copy.deepcopy(net), copy.deepcopy(result.model)
    with torch.no_grad():
        assert result.model(x).shape == (2, 10)  # float32 again after the float64 check
