"""Verified pruning: every result is checked against the dense model with the removed channels zeroed, unsafe
groups are refused up front with a reason, outputs are found by graph position, all example-input forms work."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import regprune
from regprune import UserError, create_model
from regprune.graph import analyze
from regprune.surgery import apply_picks, max_abs_diff, reference_model
from regprune.verify import ModelSnapshot


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _pruned_or_refused(model, x, **kw):
    """Prune a copy; the result must verify (and run), or be refused with a one-line UserError."""
    before = copy.deepcopy(model)
    try:
        res = regprune.prune(model, x, **kw)
    except UserError as exc:
        assert "\n" not in str(exc)
        assert _same_params(model, before)
        return None, str(exc)
    assert res.verification and res.verification["verified"] and res.verification["modes"][0] == "eval"
    assert _same_params(model, before)  # the caller's model is untouched
    return res, ""


class PixelShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.conv3 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv3(self.shuffle(self.conv2(F.relu(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_a_pixel_shuffle_group_refused_and_rest_verified():
    m, x = PixelShuffleNet(), torch.randn(1, 3, 8, 8)
    g = analyze(m, x, include_coupled=True)
    assert g.groups["conv2"].unsafe and "unsafe" in g.groups["conv2"].reason
    res, _ = _pruned_or_refused(m, x, ratios="conv1:0.5")
    assert res is not None and res.model.conv2.in_channels == 4
    with pytest.raises(UserError, match="matches no prunable layer.*unsafe"):
        regprune.prune(m, x, ratios="conv2:0.5")


class LogSoftmaxNet(nn.Module):
    def __init__(self, final="log_softmax"):
        super().__init__()
        self.final = final
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        x = self.fc(F.relu(self.fc1(x)))
        return F.log_softmax(x, 1) if self.final == "log_softmax" else torch.sigmoid(x)


@pytest.mark.parametrize("final", ["log_softmax", "sigmoid"])
def test_b_output_found_through_functions(final):
    m, x = LogSoftmaxNet(final), torch.randn(1, 3, 8, 8)
    g = analyze(m, x, include_coupled=True)
    assert g.groups["fc"].reason.startswith("network output")
    res, _ = _pruned_or_refused(m, x, ratios="0.5", include_coupled=True)
    assert res.model(x).shape == (1, 10)


def test_b_squeezenet_keeps_its_classes():
    m, x = create_model("torchvision.squeezenet1_1", num_classes=1000), torch.randn(1, 3, 64, 64)
    g = analyze(m, x)
    assert g.groups["classifier.1"].reason.startswith("network output")
    res, _ = _pruned_or_refused(m, x, speedup=1.5)
    assert res.model(x).shape == (1, 1000)


class DeadConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.dead = nn.Conv2d(8, 4, 1)
        self.conv3 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        self.dead(a)  # computed and thrown away
        a = self.conv2(a)
        b = self.conv4(F.relu(self.conv3(x)))
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


def test_c_thrown_away_consumer_refuses_its_group_only():
    m, x = DeadConvNet(), torch.randn(1, 3, 8, 8)
    g = analyze(m, x)
    assert g.groups["conv1"].unsafe and "never reached: dead" in g.groups["conv1"].reason
    assert g.groups["conv3"].in_scope
    res, _ = _pruned_or_refused(m, x, ratios="0.5")
    assert "conv1" not in res.picks and "conv3" in res.picks


class TransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.up(F.relu(self.conv1(x)))))


def test_d_transposed_conv_counted_and_verified():
    m, x = TransposeNet(), torch.randn(1, 3, 8, 8)
    res, _ = _pruned_or_refused(m, x, ratios="0.5", include_coupled=True)
    from regprune.counting import count_macs
    assert res.plan.pruned_macs == count_macs(res.model, x)
    assert res.model.up.in_channels == 4 and res.model.up.out_channels == 4


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3)
        self.conv2 = nn.Conv1d(8, 8, 3)
        self.fc = nn.Linear(8 * 28, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).flatten(1))


def test_e_conv1d_is_pruned():
    m, x = Conv1dNet(), torch.randn(1, 3, 32)
    res, why = _pruned_or_refused(m, x, ratios="0.5", include_coupled=True)
    assert res is not None, why
    assert res.model.conv1.out_channels == 4 and res.model.conv2.in_channels == 4
    assert res.plan.dense_macs == 3 * 8 * 3 * 30 + 8 * 8 * 3 * 28 + 8 * 28 * 10


class ChannelBiasNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x) + self.bias)
        return self.fc(self.conv2(x).mean((2, 3)))


def test_f_per_channel_parameter_pruned_exactly_and_saved(tmp_path):
    m, x = ChannelBiasNet(), torch.randn(1, 3, 8, 8)
    res, why = _pruned_or_refused(m, x, ratios="conv1:0.5")
    assert res is not None, why
    assert res.model.bias.shape == (1, 4, 1, 1)
    assert res.verification["max_rel_diff"] < 1e-5  # the reference ignores the bias of removed channels
    path = regprune.save(res.model, tmp_path / "m.safetensors")
    loaded, _ = regprune.load(path, model=ChannelBiasNet())
    assert max_abs_diff(loaded, res.model, x) == 0


def test_g_googlenet_aux_heads_cannot_break_training():
    m = create_model("torchvision.googlenet", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    g = analyze(m, x)
    assert g.train_only  # the auxiliary heads run only in train mode
    res, why = _pruned_or_refused(m, x, ratios="0.5")
    if res is not None:
        res.model.train()
        out = res.model(torch.randn(2, 3, 64, 64))
        assert out[0].shape == (2, 10)


def test_h_regularizer_loop_keeps_optimizer_and_refuses_second_prune():
    torch.manual_seed(0)
    m = create_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    reg = regprune.regularizer(m, x, "greg1", ratios="*layer*.conv1:0.5", iters=4)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(2, 3, 32, 32)).sum().backward()
        reg.after_backward()
        opt.step()
        reg.on_step_end()
    reg.prune(optimizer=opt)
    in_opt = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert all(id(p) in in_opt for p in m.parameters())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.zero_grad()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    with pytest.raises(UserError, match="already pruned"):
        reg.prune()
    with pytest.raises(UserError, match="already pruned"):
        reg.after_backward()


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, image, mask):
        x = self.mix(F.relu(self.a(image)) * torch.sigmoid(self.b(mask)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("form", ["tuple", "list", "dict"])
def test_i_example_inputs_in_every_form(form):
    m = TwoInputs()
    image, mask = torch.randn(1, 3, 8, 8), torch.randn(1, 1, 8, 8)
    x = {"tuple": (image, mask), "list": [image, mask], "dict": {"image": image, "mask": mask}}[form]
    res, why = _pruned_or_refused(m, x, ratios="0.5", include_coupled=True)
    assert res is not None, why
    assert res.model.mix.in_channels == 4


def test_i_bad_example_inputs_is_a_user_error():
    with pytest.raises(UserError, match="example_inputs"):
        regprune.prune(TwoInputs(), "image", ratios="0.5")


class ShuffleUnit(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, F.relu(self.branch(b))], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.head(x).mean((2, 3)))


class PartialConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.part = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = torch.split(x, [2, 6], dim=1)
        x = torch.cat([self.part(a), b], 1)
        return self.fc(self.head(x).mean((2, 3)))


@pytest.mark.parametrize("cls", [ShuffleUnit, PartialConv])
def test_j_shuffle_and_partial_conv_never_come_back_broken(cls):
    m, x = cls(), torch.randn(1, 3, 8, 8)
    res, why = _pruned_or_refused(m, x, ratios="0.5", include_coupled=True)
    if res is not None:
        assert res.model(x).shape == (1, 10)
    g = analyze(m, x, include_coupled=True)
    stem = g.group_of("stem")
    assert stem.unsafe and stem.reason.startswith("unsafe"), stem.reason


def test_k_unreachable_target_is_refused():
    m, x = create_model("resnet56"), torch.randn(1, 3, 32, 32)
    with pytest.raises(UserError, match="include-coupled|include_coupled"):
        regprune.prune(m, x, speedup=1000)


def test_failed_inplace_surgery_restores_the_model_and_names_the_group():
    m, x = PixelShuffleNet(), torch.randn(1, 3, 8, 8)
    before = copy.deepcopy(m)
    params = list(m.parameters())
    g = analyze(m, x, include_coupled=True)
    with pytest.raises(UserError, match="conv2"):
        apply_picks(g, {"conv2": [0, 1]})
    assert _same_params(m, before) and all(a is b for a, b in zip(params, m.parameters()))
    assert m(x).shape == (1, 10)


def test_reference_handles_channels_last_linear_and_layer_scale():
    class Block(nn.Module):  # ConvNeXt-style: permute, Linear on the last axis, layer scale
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.fc1 = nn.Linear(8, 32)
            self.fc2 = nn.Linear(32, 8)
            self.gamma = nn.Parameter(torch.rand(8) + 0.5)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.fc2(F.gelu(self.fc1(y))) * self.gamma
            return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))

    m, x = Block(), torch.randn(1, 8, 6, 6)
    g = analyze(m, x)
    ref = reference_model(g, {"fc1": [0, 3, 5]})
    pruned = copy.deepcopy(m)
    apply_picks(analyze(pruned, x), {"fc1": [0, 3, 5]})
    assert pruned.fc1.out_features == 29 and max_abs_diff(ref, pruned, x) < 1e-5


def test_model_snapshot_restores_parameters_in_place():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    w = m[0].weight
    snap = ModelSnapshot(m)
    m[0].weight = nn.Parameter(torch.zeros(2, 3, 3, 3))
    m[0].out_channels = 2
    snap.restore()
    assert m[0].weight is w and m[0].out_channels == 4


def test_ddp_wrapped_model_is_refused_with_the_way_out():
    m = nn.DataParallel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)))
    with pytest.raises(UserError, match="model.module"):
        regprune.prune(m, torch.randn(1, 3, 8, 8), ratios="0.5")


def test_whole_batch_is_verified_and_modes_and_inputs_are_kept():
    class SizeBranch(nn.Module):  # a forward that branches on the batch size
        def __init__(self):
            super().__init__()
            self.c1, self.a, self.b = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 4, 1), nn.Conv2d(16, 4, 1)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            y = self.bn(self.c1(x))
            return (self.b(y) if x.shape[0] > 2 else self.a(y)).mean((2, 3))

    m = SizeBranch()
    m.train()
    m.bn.eval()  # a frozen BN inside a training model
    x = torch.randn(8, 3, 16, 16)
    x0 = x.clone()
    res = regprune.prune(m, x, ratios="c1:0.5", include_coupled=True)
    assert res.model(x).shape == (8, 4)
    assert m.training and not m.bn.training and res.model.training and not res.model.bn.training
    assert torch.equal(x, x0)


def test_api_argument_types_are_user_errors():
    m, x = LogSoftmaxNet(), torch.randn(1, 3, 8, 8)
    assert regprune.prune(m, x, ratios=0.5, include_coupled=True).plan.removal  # a bare number works
    for kw in ({"speedup": "2"}, {"ratios": "0.5", "round_to": 2.5}, {"ratios": ["0.5"]}):
        with pytest.raises(UserError):
            regprune.prune(m, x, **kw)
    res = regprune.prune(m, x, ratios="0.5", include_coupled=True, skip="fc1")  # one pattern as a string
    assert "fc1" not in res.picks


def test_run_helpers_and_reference_keep_their_old_import_path():
    import regprune.forward as fwd
    import regprune.reference as ref
    import regprune.verify as V

    for name in ("check_example_inputs", "train_batch", "cloned_inputs", "float64_copy", "modes_kept", "buffers_kept",
                 "run_in_mode"):
        assert getattr(V, name) is getattr(fwd, name)
    assert V.zero_consumers is ref.zero_consumers and V.consumer_columns is ref.consumer_columns
    grown = fwd.train_batch((torch.ones(1, 3), torch.tensor([[4]])))
    assert grown[0].shape == (2, 3) and torch.equal(grown[1], torch.tensor([[4], [4]]))
    assert fwd.batch_size({"a": 1, "b": torch.zeros(5, 2)}) == 5 and fwd.batch_size(torch.tensor(1.0)) is None


def test_zero_inputs_zeroes_every_filter_of_the_channels_group():
    from regprune.reference import zero_inputs

    conv = nn.Conv2d(4, 6, 1, groups=2, bias=False)
    nn.init.ones_(conv.weight)
    zero_inputs(conv, [3])  # group 1, its second input channel
    assert conv.weight[3:, 1].abs().sum() == 0 and conv.weight[:3].abs().min() == 1 and conv.weight[3:, 0].min() == 1
    with pytest.raises(UserError, match="cannot build a reference"):
        zero_inputs(nn.Embedding(4, 2), [0])
