"""GReg in short budgets: GReg-2's pick phase, Group-GReg's penalty, the group criterion, grouped convs, the
unstructured all-layer scope and BN recalibration (behaviour, not accuracy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import regprune
from regprune.api import l1_picks, plan_targets
from regprune.engine import recalibrate_bn
from regprune.errors import UserError
from regprune.methods.greg import GRegConfig

from helpers import regularize


pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBNConv(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> pool -> fc: conv1's channels form one block-internal group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class GroupedBlock(nn.Module):
    """1x1 conv -> grouped 3x3 conv (4 channel blocks) -> 1x1 conv: ResNeXt's bottleneck in small."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.a = nn.Conv2d(16, 32, 1)
        self.bna = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bnb = nn.BatchNorm2d(32)
        self.c = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        y = F.relu(self.bna(self.a(h)))
        y = F.relu(self.bnb(self.b(y)))
        h = h + self.c(y)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_scaled_greg2_pick_phase_integrates_the_papers_amount() -> None:
    for budget, lr in ((1000, 0.01), (3000, 0.001)):
        cfg = GRegConfig.scaled(budget, "greg2", lr=lr, momentum=0.9)
        plan = cfg.planned_iters("greg2")
        assert plan["pick"] == pytest.approx(budget * 10_000 / 120_000, rel=0.15)  # the paper's share of the run
        assert cfg.predict("greg2")["pick_decay"] == pytest.approx(GRegConfig().predict("greg2")["pick_decay"], rel=0.02)


def test_group_penalty_touches_exactly_the_groups_members_and_slices() -> None:
    torch.manual_seed(0)
    model = ConvBNConv()
    reg = regprune.regularizer(model, _x(), "greg1", ratios="conv1:0.5", iters=50, penalty="group", lr_prune=0.01)
    (t,) = reg.targets
    assert t.name == "conv1"
    names = {n for n, _, _ in t.coupled}
    assert names == {"bn1.weight", "bn1.bias", "conv2.weight"}
    for _ in range(20):  # let the penalty grow above zero
        reg.on_step_end()
    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.after_backward()
    pruned = torch.tensor(reg.picks()["conv1"])
    lam = reg.greg.lambdas()["conv1"]
    assert (lam[pruned] > 0).all()
    mask = torch.zeros(16, dtype=torch.bool)
    mask[pruned] = True
    g = dict(model.named_parameters())
    assert torch.allclose(g["conv1.weight"].grad[mask], lam[mask].view(-1, 1, 1, 1) * g["conv1.weight"][mask])
    assert (g["conv1.weight"].grad[~mask] == 0).all()
    assert torch.allclose(g["bn1.weight"].grad, lam * g["bn1.weight"])
    assert torch.allclose(g["bn1.bias"].grad, lam * g["bn1.bias"])
    assert torch.allclose(g["conv2.weight"].grad, lam.view(1, -1, 1, 1) * g["conv2.weight"])
    untouched = ["conv1.bias", "conv2.bias", "bn2.weight", "bn2.bias", "fc.weight", "fc.bias"]
    assert all((g[n].grad == 0).all() for n in untouched)

    # the paper's filter penalty: the root filters only
    model2 = ConvBNConv()
    reg2 = regprune.regularizer(model2, _x(), "greg1", ratios="conv1:0.5", iters=50, lr_prune=0.01)
    assert reg2.targets[0].coupled == [] and reg2.greg.config.penalty == "filter"


def test_group_criterion_picks_equal_group_l1_and_differ_from_filter() -> None:
    torch.manual_seed(1)
    model = ConvBNConv()
    with torch.no_grad():  # make conv2's input columns disagree with conv1's filter norms
        model.conv2.weight.mul_(torch.linspace(0.01, 3, 16).view(1, -1, 1, 1))
    reg = regprune.regularizer(model, _x(), "greg1", ratios="conv1:0.5", iters=50, criterion="group")
    group_l1 = l1_picks(reg.graph, plan_targets(reg.graph, reg.plan), criterion="group")
    filter_l1 = l1_picks(reg.graph, plan_targets(reg.graph, reg.plan), criterion="filter")
    assert reg.picks() == group_l1
    assert group_l1 != filter_l1


@pytest.mark.parametrize("method", ["greg1", "greg2"])
def test_greg_through_grouped_convs_prunes_whole_positions_and_verifies(method: str) -> None:
    torch.manual_seed(0)
    model = GroupedBlock()
    x = _x()
    ref = model(x)
    reg = regprune.regularizer(model, x, method, ratios="a:0.5", iters=40, lr_prune=0.01)
    assert reg.targets[0].ch_groups == 4
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    regularize(reg, model, opt, [(x, torch.randint(0, 5, (4,)))])
    picks = reg.picks()["a"]
    assert len(picks) == 16
    rel = {i % 8 for i in picks}
    assert len(rel) == 4 and sorted(picks) == sorted(b * 8 + r for b in range(4) for r in rel)
    reg.prune(optimizer=opt)
    assert model.a.out_channels == 16 and model.b.groups == 4 and model.b.in_channels == 16
    assert model.regprune_verification["max_rel_diff"] < 1e-6
    assert ref.shape == model(x).shape


def test_unstructured_scope_covers_every_conv_and_linear_layer() -> None:
    model = ConvBNConv()
    reg = regprune.regularizer(model, _x(), "greg1", unstructured=True, sparsity=0.8, iters=30)
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {t.name for t in reg.targets} == layers
    for t in reg.targets:
        assert t.n_remove == min(int(torch.tensor(0.8 * t.module.weight.numel()).ceil()), t.module.weight.numel() - 1)
    while not reg.done():
        reg.on_step_end()
    pruned = reg.prune()
    for n in layers:
        w = pruned.get_submodule(n).weight
        assert (w == 0).float().mean().item() == pytest.approx(0.8, abs=1.0 / w.numel() + 1e-6)
    skipped = regprune.regularizer(ConvBNConv(), _x(), "greg1", unstructured=True, sparsity=0.5, iters=30, skip=["fc"])
    assert "fc" not in {t.name for t in skipped.targets}
    with pytest.raises(UserError, match="unstructured=True"):
        regprune.regularizer(ConvBNConv(), _x(), "greg1", sparsity=0.5)
    with pytest.raises(UserError, match="not both"):
        regprune.regularizer(ConvBNConv(), _x(), "greg1", unstructured=True, sparsity=0.5, speedup=2)
    with pytest.raises(UserError, match="out of range"):
        regprune.regularizer(ConvBNConv(), _x(), "greg1", unstructured=True, sparsity=1.0)


def test_bn_recalibration_changes_only_running_statistics() -> None:
    torch.manual_seed(0)
    model = ConvBNConv()
    model.eval()
    model.conv1.train()  # a module's own flag is restored too
    params = {n: p.clone() for n, p in model.named_parameters()}
    before = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    data = [(torch.randn(8, 3, 8, 8) * 3 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(5)]
    used = recalibrate_bn(model, data, batches=3)
    assert used == 3
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model.bn1.momentum == 0.1 and model.bn2.momentum == 0.1
    changed = {n for n, b in model.named_buffers() if not torch.equal(b, before[n])}
    assert changed == {f"{bn}.{k}" for bn in ("bn1", "bn2") for k in ("running_mean", "running_var",
                                                                      "num_batches_tracked")}
    assert int(model.bn1.num_batches_tracked) == 3
    # the running mean is the plain mean over the three batches (momentum None during recalibration)
    with torch.no_grad():
        means = torch.stack([model.conv1(x).mean(dim=(0, 2, 3)) for x, _ in data[:3]]).mean(0)
    assert torch.allclose(model.bn1.running_mean, means, atol=1e-5)
    assert recalibrate_bn(model, data, batches=0) == 0
    assert recalibrate_bn(nn.Linear(3, 3), [torch.randn(2, 3)], batches=4) == 0
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_bn(ConvBNConv(), [], batches=2)
    # `batches` is a whole number: bools, floats and None are refused before anything runs
    for bad in (True, 2.0, 2.5, None, "3"):
        with pytest.raises(ValueError, match="batches must be"):
            recalibrate_bn(model, data, batches=bad)
    with pytest.raises(ValueError, match=">= 0"):
        recalibrate_bn(model, data, batches=-1)
    # a dict batch (keyword inputs) gets a clear TypeError, and the statistics are left as they were
    stats = {n: b.clone() for n, b in model.named_buffers()}
    for batch in ({"x": data[0][0]}, ({"x": data[0][0]}, data[0][1])):
        with pytest.raises(TypeError, match="input tensors or \\(inputs, targets\\) pairs"):
            recalibrate_bn(model, [batch], batches=1)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())


def test_short_budget_advice_clears_its_own_warning_and_names_the_right_lever() -> None:
    import re

    for budget, momentum in ((100, 0.9), (3, 0.9), (300, 0.99)):
        pred = GRegConfig.scaled(budget, "greg1", momentum=momentum).predict("greg1")
        assert not pred["reaches"]
        n = int(re.search(r"about (\d+) iterations", pred["warning"]).group(1))
        assert GRegConfig.scaled(n, "greg1", momentum=momentum).predict("greg1")["reaches"]
        # at the stability bound a larger learning rate changes nothing: the advice says so
        assert "larger learning rate" not in pred["warning"] and "stability bound" in pred["warning"]
    with pytest.raises(UserError, match="whole number"):
        GRegConfig.scaled(100.7, "greg1")
    with pytest.raises(UserError, match="whole number"):
        GRegConfig.scaled(True, "greg1")
    with pytest.raises(UserError, match="mag_ratio_limit"):
        GRegConfig(mag_ratio_limit=1.0)
    with pytest.raises(UserError, match="lr_prune"):
        GRegConfig.scaled(100, "greg1", lr=float("inf"))
    with pytest.raises(UserError, match="disagree"):
        GRegConfig.scaled(100, "greg1", lr=0.01, lr_prune=0.1)


def test_regularizer_settings_errors_and_schedule_warning() -> None:
    with pytest.raises(UserError, match="unknown GReg setting 'foo'"):
        regprune.regularizer(ConvBNConv(), _x(), "greg1", ratios="conv1:0.5", foo=1)
    reg = regprune.regularizer(ConvBNConv(), _x(), "greg1", ratios="conv1:0.5", lr=0.02)  # the optimizer's name
    assert reg.greg.config.lr_prune == 0.02
    with pytest.warns(UserWarning, match="GReg schedule: the schedule integrates a decay"):
        regprune.regularizer(ConvBNConv(), _x(), "greg1", ratios="conv1:0.5", iters=20)
    early = regprune.regularizer(ConvBNConv(), _x(), "greg2", ratios="conv1:0.5", iters=200, lr_prune=0.01)
    with pytest.raises(UserError, match="has not picked yet"):
        early.prune()


def test_unstructured_prune_with_optimizer_keeps_the_zeros_through_training() -> None:
    torch.manual_seed(0)
    model = ConvBNConv()
    x, y = _x(8), torch.randint(0, 4, (8,))
    reg = regprune.regularizer(model, x, "greg1", unstructured=True, sparsity=0.7, iters=30, lr_prune=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    regularize(reg, model, opt, [(x, y)])
    reg.prune(optimizer=opt)
    zeros = {n: (model.get_submodule(n).weight == 0).clone() for n in ("conv1", "conv2", "fc")}
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, z in zeros.items():
        w = model.get_submodule(n).weight
        assert (w[z] == 0).all() and z.float().mean() >= 0.69
    with pytest.warns(UserWarning, match="grow back"):
        other = regprune.regularizer(ConvBNConv(), x, "greg1", unstructured=True, sparsity=0.5, iters=10)
        while not other.done():
            other.on_step_end()
        other.prune()
