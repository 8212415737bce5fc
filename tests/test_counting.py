"""The MACs counter on every layer kind the graph can cut, example inputs in every form, layers it cannot see,
and the planner's estimate, target and no-op rules. Expected MACs are worked out by hand in each test."""

import pytest
import torch
import torch.nn as nn

from regprune import UserError, create_model
from regprune.cli import main
from regprune.counting import (call_model, channels, count_macs, is_counted, is_depthwise, layer_macs,
                               uncounted_layers)
from regprune.graph import analyze
from regprune.ratios import estimate_macs, make_plan


class Seq1d(nn.Module):
    """Conv1d(3,8,3) -> Conv1d(8,4,3) -> flatten -> Linear(112,10) on length 32 (no padding)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3)
        self.c2 = nn.Conv1d(8, 4, 3)
        self.fc = nn.Linear(4 * 28, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def test_conv1d_chain_and_flattened_linear_per_sample():
    # c1: weight 8*3*3=72 x 30 positions; c2: 4*8*3=96 x 28; fc: 112*10=1120 x 1
    expected = {"c1": 72 * 30, "c2": 96 * 28, "fc": 1120}
    m = Seq1d()
    assert layer_macs(m, torch.randn(1, 3, 32)) == expected
    assert count_macs(m, torch.randn(5, 3, 32)) == 5968  # the batch is divided out
    assert m.training  # training mode restored


def test_conv3d_strided():
    m = nn.Sequential(nn.Conv3d(2, 4, 3, stride=2, padding=1))
    # weight 4*2*27=216; output (2, 3, 3) = 18 positions
    assert count_macs(m, torch.randn(2, 2, 4, 6, 6)) == 216 * 18


def test_conv_transpose_counts_input_positions():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, stride=2),
                      nn.ReLU(), nn.Conv2d(4, 2, 1))
    macs = layer_macs(m, torch.randn(1, 3, 8, 8))
    # conv: 216 x 64; transposed: weight 8*4*2*2=128 x 64 input positions (= 256 outputs x 4 x 8 x 1 tap);
    # 1x1 conv: 8 x 256
    assert macs == {"0": 216 * 64, "2": 128 * 64, "4": 8 * 256}
    assert channels(m[2]) == (4, 8) and is_counted(m[2]) and not is_depthwise(m[2])


def test_grouped_and_depthwise_convs():
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    m = nn.Sequential(grouped, dw)
    # grouped: weight 16*2*9=288 x 25; depthwise: 16*1*9=144 x 25
    assert layer_macs(m, torch.randn(1, 8, 5, 5)) == {"0": 288 * 25, "1": 144 * 25}
    assert is_depthwise(dw) and not is_depthwise(grouped)
    assert is_depthwise(nn.Conv1d(6, 6, 3, groups=6)) and is_depthwise(nn.Conv3d(4, 8, 1, groups=4))
    assert not is_depthwise(nn.ConvTranspose2d(6, 6, 3, groups=6))
    assert not is_depthwise(nn.Linear(4, 4)) and not is_counted(nn.BatchNorm2d(4))
    with pytest.raises(TypeError):
        channels(nn.BatchNorm2d(4))


def test_linear_on_token_sequences():
    m = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2))
    # 7 tokens per sample: 30*7 + 10*7
    assert count_macs(m, torch.randn(3, 7, 6)) == 280
    assert count_macs(m, torch.randn(3, 6)) == 40


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, image, extra):
        return self.conv(image).mean((2, 3)) + self.fc(extra)


def test_example_inputs_as_tuple_list_and_dict():
    m = TwoInputs()
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 5)
    expected = 12 * 16 + 20
    assert count_macs(m, (a, b)) == expected
    assert count_macs(m, [a, b]) == expected
    assert count_macs(m, {"image": a, "extra": b}) == expected
    assert torch.equal(call_model(m, {"extra": b, "image": a}), m(a, b))


class Mixed(nn.Module):
    """Counted layers, layers with uncounted MACs, and parameter holders that carry none."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 1)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.PReLU()
        self.scale = nn.Parameter(torch.ones(8, 1))  # a per-channel layer scale
        self.pos = nn.Parameter(torch.zeros(1, 5, 8))  # added, broadcast over the batch
        self.mix = nn.Parameter(torch.randn(8, 8))  # a weight matrix used functionally
        self.unused = nn.GRU(8, 8)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos
        x = self.attn(x, x, x, need_weights=False)[0]
        x = self.ln(self.lstm(x)[0])
        x = self.act(self.bn(self.conv(x.transpose(1, 2)))) * self.scale
        return x.transpose(1, 2) @ self.mix


def test_attention_and_function_products_are_counted_rnn_is_flagged():
    m = Mixed()
    tokens = torch.randint(0, 20, (2, 5))
    # attention (E=8, L=S=5) per sample: input projections 3*5*8*8 = 960, QK^T and AV 2*5*5*8 = 400 -> "attn";
    # out_proj 5*8*8 = 320 (F.linear on its weight); conv 64 x 5 positions; x @ mix (5, 8) @ (8, 8) = 320 -> ""
    assert layer_macs(m, tokens) == {"attn": 1360, "attn.out_proj": 320, "conv": 320, "": 320}
    assert uncounted_layers(m, tokens) == [("lstm", "LSTM")]  # recurrent layers stay uncounted, and said so


def test_uncounted_layers_quiet_on_plain_cnn():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    assert uncounted_layers(m, torch.randn(1, 3, 6, 6)) == []


class Split(nn.Module):
    """conv a (8 channels) split in two fixed halves, each read by its own conv (4 input channels)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)
        self.c = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        p, q = torch.split(torch.relu(self.a(x)), 4, 1)
        return self.head(torch.cat([self.b(p), self.c(q)], 1).mean((2, 3)))


def test_estimate_macs_on_split_group_is_proportional_and_never_negative():
    g = analyze(Split(), torch.randn(1, 3, 14, 14))
    assert {m.name for m in g.groups["a"].members if m.side == "in"} == {"b", "c"}
    a, b, c = 27 * 8 * 196, 36 * 8 * 196, 36 * 8 * 196
    assert g.layer_macs == {"a": a, "b": b, "c": c, "head": 32}
    # 4 of a's 8 channels: b and c each lose 4 * 4/8 = 2 of their 4 inputs
    assert estimate_macs(g, {"a": 4}) == a // 2 + b // 2 + c // 2 + 32
    # 7 of 8: each reader keeps 1/8 of its inputs (was -79,348 MACs when each lost 7 of 4)
    assert estimate_macs(g, {"a": 7}) == (a + b + c) // 8 + 32


def test_unreachable_speedup_names_the_best_and_include_coupled():
    g = analyze(create_model("resnet20"), torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError, match=r"speedup 1000x is out of reach for this scope: at most \d+\.\d\dx") as e:
        make_plan(g, speedup=1000)
    assert "--include-coupled" in str(e.value) and "include_coupled=True" in str(e.value)
    with pytest.raises(UserError, match="MACs target 0.001 is out of reach"):
        make_plan(g, target_macs=0.001)
    wide = analyze(create_model("resnet20"), torch.randn(1, 3, 32, 32), include_coupled=True)
    with pytest.raises(UserError, match="out of reach") as e:
        make_plan(wide, speedup=1000)
    assert "--include-coupled" not in str(e.value)


@pytest.mark.parametrize("kw", [dict(speedup=3.0), dict(target_macs=0.45), dict(target_macs=0.6, skip=["layer1*"]),
                                dict(spec="*layer1*:0.2,*layer3*:0.6", speedup=2.0)])
def test_reached_targets_within_two_percent(kw):
    kw = dict(kw)
    spec = kw.pop("spec", None)
    g = analyze(create_model("resnet20"), torch.randn(1, 3, 32, 32))
    plan = make_plan(g, spec, **kw)
    target = kw.get("target_macs") or 1 / kw["speedup"]
    assert abs(plan.pruned_macs / plan.dense_macs - target) <= 0.02 * target
    if "skip" in kw:  # solved over the groups the plan keeps
        assert plan.removal and not any(r.startswith("layer1") for r in plan.removal)


def test_nothing_to_prune():
    g = analyze(create_model("resnet20"), torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError, match="nothing to prune: the ratio spec"):
        make_plan(g, "*.conv1:0")
    with pytest.raises(UserError, match="nothing to prune: speedup 1x keeps every channel"):
        make_plan(g, speedup=1.0)
    with pytest.raises(UserError, match="nothing to prune: --skip excludes every in-scope group"):
        make_plan(g, speedup=2.0, skip=["layer*"])
    lone = analyze(nn.Sequential(nn.Linear(4, 3)), torch.randn(1, 4))  # its only group is the network output
    with pytest.raises(UserError, match="nothing to prune: no channel group is in the prunable scope"):
        make_plan(lone, speedup=2.0)
    with pytest.raises(UserError, match="nothing to prune"):
        make_plan(lone, "0.5")


def test_cli_inspect_refuses_unreachable_speedup(capsys):
    assert main(["inspect", "--model", "resnet20", "--speedup", "1000"]) == 2
    err = capsys.readouterr().err
    assert "out of reach" in err and "--include-coupled" in err


def test_target_between_two_channel_steps_is_refused():
    g = analyze(Seq1d(), torch.randn(1, 3, 32))
    assert [x.root for x in g.scope()] == ["c1"]
    # one of c1's 8 channels is 1/8 of c1 and of c2: (2160 + 2688) / 8 = 606 MACs, 10.2% of 5968
    assert estimate_macs(g, {"c1": 1}) == 5968 - 606
    with pytest.raises(UserError, match=r"MACs target 0.94 cannot be met within 2%: the nearest plan keeps 0\.898"):
        make_plan(g, target_macs=0.94)
    plan = make_plan(g, target_macs=0.9)
    assert plan.removal == {"c1": 1}


def _tiny_vit(kind):
    """2 layers, 2 heads, width 32, MLP 128, 32x32 input in 8x8 patches: 16 patches + class token = 17 tokens."""
    if kind == "torchvision":
        import torchvision

        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=128, num_classes=10)
    import timm

    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                            num_heads=2, mlp_ratio=4.0, num_classes=10)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_vit_attention_macs_by_hand(kind):
    # per layer: q, k, v projections 3*17*32*32 = 52224, QK^T and AV 2*17*17*32 = 18496, output projection
    # 17*32*32 = 17408, MLP 2*17*32*128 = 139264; patch embedding 32*3*8*8 = 6144 x 16 patches; head 32*10
    expected = 6144 * 16 + 2 * (52224 + 18496 + 17408 + 139264) + 320
    m, x = _tiny_vit(kind), torch.randn(3, 3, 32, 32)
    assert count_macs(m, x) == expected == 553408
    g = analyze(m, x[:1])
    assert sum(g.layer_macs.values()) == g.total_macs == expected  # the planner's table is the same counter
    assert not g.uncounted


@pytest.mark.parametrize("name,size", [("vit_b_16", 224), ("swin_t", 224)])
def test_counting_matches_torchvision_published_ops(name, size):
    import torchvision

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    published = weights.meta["_ops"] * 1e9  # GFLOPS in torchvision's tables are multiply-accumulates
    m, x = torchvision.models.get_model(name), torch.zeros(1, 3, size, size)
    assert abs(count_macs(m, x) - published) <= 0.02 * published  # measured: within 0.01%
    assert uncounted_layers(m, x) == []  # nothing left out (Swin's position-bias tables are look-ups)


def test_vit_plan_estimate_equals_counted_pruned_model():
    import regprune

    m, x = _tiny_vit("torchvision"), torch.randn(1, 3, 32, 32)
    res = regprune.prune(m, x, ratios="0.5")  # the MLP hidden widths; attention stays whole
    assert res.plan.dense_macs == count_macs(m, x) == 553408
    assert res.plan.pruned_macs == count_macs(res.model, x) == 553408 - 2 * 139264 // 2
