"""Pruning from scratch: gates, the shared pruning module, nuclear/MACs losses, exact reconfiguration."""

import copy

import pytest
import torch
import torch.nn.functional as F

from regprune import UserError, create_model
from regprune.counting import count_macs
from regprune.methods.spm import GATES_ATTR, ChannelGate, GateSet, SPMRegularizer, insert_gates
from regprune.reconfigure import reconfigure
from regprune.models.cifar import PadShortcut
from helpers import randomise_bn, regularize


def _random_gates(gates: GateSet, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.parameters():
            p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these small models gain nothing from threads, and two-thread runs crawl on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def r20_input():
    torch.manual_seed(0)
    return torch.randn(4, 1, 16, 16)


def _r20(x):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    randomise_bn(model)
    return model, insert_gates(model, x[:1])


def test_ste_passes_gradient_unchanged():
    gate = ChannelGate(5)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([0.2, 0.49, 0.51, 0.6, 3.0]))
    m = gate.mask()
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # exactly binary, even for w far from 1
    up = torch.randn(5)
    (m * up).sum().backward()
    assert torch.equal(gate.weight.grad, up)
    x = torch.randn(2, 5, 3, 3)
    assert torch.equal(gate(x), x * m.detach().view(1, 5, 1, 1))


def test_frozen_on_off_set_moves_with_the_module_and_stays_out_of_the_state_dict():
    # a frozen gate's on/off set must follow model.to(device) (a CUDA scratch job moves the model between the
    # GPU and the CPU after freezing), and the model's state dict keeps its keys
    gate = ChannelGate(4, init=0.6)
    keys = set(gate.state_dict())
    gate.fix()
    assert "fixed" in dict(gate.named_buffers())
    assert set(gate.state_dict()) == keys
    gate.to(torch.device("meta"))
    assert gate.fixed.device.type == "meta" and gate.weight.device.type == "meta"
    gate.unfix()
    assert gate.fixed is None


def test_gate_never_empty_and_periodic():
    gate = ChannelGate(6, init=0.1)
    with torch.no_grad():
        gate.weight[4] = 0.3
    assert gate.hard().tolist() == [False] * 4 + [True, False]  # the largest weight stays on
    grouped = ChannelGate(6, repeat=3)
    assert grouped.weight.shape == (2,)
    with torch.no_grad():
        grouped.weight[1] = 0.0
    assert grouped.channel_hard().tolist() == [True, False] * 3


def test_gates_start_on_and_are_registered(r20_input):
    x = r20_input
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    randomise_bn(model)
    dense = copy.deepcopy(model)
    model.train()
    gates = insert_gates(model, x[:1])
    assert model.training  # tracing must not leave the search in eval mode
    model.eval()
    dense.eval()
    assert torch.equal(model(x), dense(x))
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in gates.parameters())  # optimizers over model.parameters() see them
    assert len(list(gates.parameters())) == len(gates)
    assert "fc" not in gates.roots  # the classifier output is never gated
    gates.remove()
    assert not hasattr(model, GATES_ATTR)
    assert torch.equal(model(x), dense(x))
    with pytest.raises(UserError):
        insert_gates(model, x[:1], groups=["fc"])


def test_shared_gate_per_residual_stream(r20_input):
    model, gates = _r20(r20_input)
    stream = gates.groups["layer2.0.conv2"]
    assert stream.coupled
    # the stage-2 stream is gated after each block's add and ReLU (the block's output), as the official code
    assert gates.placement["layer2.0.conv2"] == [("layer2.0", "output", 1), ("layer2.1", "output", 1),
                                                 ("layer2.2", "output", 1)]
    assert isinstance(model.get_submodule("layer2.0.shortcut"), PadShortcut)
    gate = gates.gate("layer2.0.conv2")
    for name in gates.sites["layer2.0.conv2"]:
        hooks = list(model.get_submodule(name)._forward_hooks.values())
        assert len(hooks) == 1
        cells = [c.cell_contents for c in hooks[0].__closure__ or ()]
        assert any(c is gate for c in cells)
    assert sum(1 for r in gates.roots if gates.groups[r].coupled) == 3  # one gate per stream, three stages
    # private gates multiply the ReLU's output: conv2's input
    assert gates.placement["layer1.0.conv1"] == [("layer1.0.conv2", "input", 1)]
    # the stem shares the stage-1 stream (identity shortcut): gated after its ReLU, where stage 1 reads it
    stem = gates.groups["conv1"]
    assert "conv1" in stem.writers and "layer1.0.conv2" in stem.writers
    assert gates.placement["conv1"][0] == ("layer1", "input", 1)


def test_torchvision_stem_gets_its_own_gate_after_relu():
    torch.manual_seed(0)
    model = create_model("torchvision.resnet50", num_classes=10, in_channels=3)
    gates = insert_gates(model, torch.randn(1, 3, 64, 64))
    assert not gates.groups["conv1"].coupled  # layer1.0 has a projection shortcut: the stem is its own group
    assert gates.placement["conv1"] == [("relu", "output", 1)]  # after the stem's ReLU, before the max-pool
    assert gates.placement["layer1.0.conv1"] == [("layer1.0.conv2", "input", 1)]


def test_off_gate_still_receives_task_gradient(r20_input):
    model, gates = _r20(r20_input)
    with torch.no_grad():
        gates.gate("layer1.0.conv1").weight[:3] = 0.3  # private channels off
        gates.gate("layer2.0.conv2").weight[:3] = 0.3  # stream channels off
        gates.gate("conv1").weight[:2] = 0.3  # stem / stage-1 stream channels off
    model.train()
    F.cross_entropy(model(r20_input), torch.tensor([0, 1, 2, 3])).backward()
    for root, n in (("layer1.0.conv1", 3), ("layer2.0.conv2", 3), ("conv1", 2)):
        g = gates.gate(root).weight.grad
        assert not bool(gates.gate(root).hard()[:n].any())
        assert bool((g[:n].abs() > 0).all()), (root, g[:n])  # the channels can come back


@pytest.mark.parametrize("name,channels,size", [
    ("resnet20", 1, 32),
    ("vgg11", 3, 32),
    ("torchvision.resnet50", 3, 64),
    ("torchvision.mobilenet_v2", 3, 64),
])
def test_reconfiguration_is_exact(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=channels)
    randomise_bn(model)
    x = torch.randn(2, channels, size, size)
    gates = insert_gates(model, x[:1])
    _random_gates(gates)
    removal = gates.removal()
    assert sum(removal.values()) > 0 and all(w > 0 for w in gates.kept_widths().values())
    predicted = gates.current_macs()
    reg = SPMRegularizer(gates, 0.5)
    assert abs(float(reg.soft_macs().detach()) - predicted) <= 1e-6 * predicted + 4
    model.eval()
    with torch.no_grad():
        gated = model(x)
    small = reconfigure(model, gates, x[:1])
    assert small is model and not hasattr(small, GATES_ATTR)
    assert all(not m._forward_hooks for m in small.modules())
    with torch.no_grad():
        assert float((small(x) - gated).abs().max()) <= 1e-5
    assert count_macs(small, x[:1]) == predicted < reg.dense_macs


def test_nuclear_loss(r20_input):
    model, gates = _r20(r20_input)
    reg = SPMRegularizer(gates, 0.5, alpha_mac=0.0)
    assert float(reg.nuclear_loss().detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        gates.gate("layer1.0.conv1").weight[:4] = 0.3
        gates.gate("layer3.0.conv2").weight[::2] = 0.3
    loss = reg.extra_loss()
    assert float(loss.detach()) > 1e-5
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(GATES_ATTR))
    g = gates.gate("layer1.0.conv1").weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    assert float(g.sum()) < 0  # restoring rows raises the nuclear norm back: the term protects gates
    assert ("layer3.1.conv2", "layer3.0.conv2") in reg.nuc_layers  # every writer of a stream is a term


def test_nuc_every(r20_input):
    _, gates = _r20(r20_input)
    reg = SPMRegularizer(gates, 0.5, alpha_mac=0.0, nuc_every=3)
    got = [reg.extra_loss() is not None for _ in range(6)]
    assert got == [True, False, False, True, False, False]


def test_macs_loss_pushes_down_above_budget(r20_input):
    _, gates = _r20(r20_input)
    for norm in ("unit", "dense"):
        reg = SPMRegularizer(gates, 0.5, alpha_nuc=0.0, mac_norm=norm, mac_unit=1e6)
        for p in gates.parameters():
            p.grad = None
        loss = reg.extra_loss()
        assert float(loss.detach()) > 0
        loss.backward()
        for root in gates.roots:
            assert bool((gates.gate(root).weight.grad > 0).all())  # descent lowers every gate
    reg = SPMRegularizer(gates, 0.5, alpha_nuc=0.0, mac_norm="dense")
    assert float(reg.soft_macs().detach()) == reg.dense_macs == reg.current_macs()
    # the paper's GMAC units: for a 40 MMAC network the term is tiny
    paper = SPMRegularizer(gates, 0.5, alpha_nuc=0.0, mac_norm="unit")
    assert float(paper.macs_loss().detach()) < 1e-3


def _total_push(reg: SPMRegularizer) -> float:
    for p in reg.gates.parameters():
        p.grad = None
    reg.macs_loss().backward()
    return sum(float(p.grad.sum()) for p in reg.gates.parameters())


def test_matched_macs_scale_at_two_network_sizes():
    from regprune.methods.spm import REF_DENSE_GMACS, REF_SHARE_SUM

    torch.manual_seed(0)
    small = SPMRegularizer(insert_gates(create_model("resnet20", in_channels=1), torch.zeros(1, 1, 16, 16)), 0.41)
    big = SPMRegularizer(insert_gates(create_model("torchvision.resnet50", num_classes=10), torch.zeros(1, 3, 64, 64)),
                         0.41)
    assert big.dense_macs > 20 * small.dense_macs
    for reg in (small, big):
        assert reg.mac_norm == "matched"  # the default
        s = reg.share_sum()
        assert reg.mac_scale == pytest.approx(0.5 * REF_DENSE_GMACS ** 2 * REF_SHARE_SUM / s, rel=1e-9)
        # the total push on the gates at the start is the paper's ResNet-50 push: 2 alpha D_ref^2 S_ref (1 - t)
        assert _total_push(reg) == pytest.approx(2 * 0.5 * REF_DENSE_GMACS ** 2 * REF_SHARE_SUM * 0.59, rel=1e-3)
    # ... whatever the size; the paper's GMAC formula would differ by (dense MACs)^2, ~600x here
    assert _total_push(small) == pytest.approx(_total_push(big), rel=1e-3)
    unit = SPMRegularizer(big.gates, 0.41, mac_norm="unit")
    assert unit.mac_scale == pytest.approx(0.5 * (big.dense_macs / 1e9) ** 2)
    # the reference constants are what the library measures (at 64 px the share sum is within 1% of 224 px)
    assert big.share_sum() == pytest.approx(REF_SHARE_SUM, rel=0.01)


def test_tie_break_orders_a_groups_gates_by_weight_magnitude(r20_input):
    model, gates = _r20(r20_input)
    root = "layer1.0.conv1"
    w = model.get_submodule(root).weight.detach()
    norms = w.reshape(w.shape[0], -1).norm(dim=1)
    reg = SPMRegularizer(gates, 0.5, alpha_nuc=0.0)
    flat = SPMRegularizer(gates, 0.5, alpha_nuc=0.0, tie_spread=0.0)
    _total_push(reg)
    g = gates.gate(root).weight.grad.clone()
    _total_push(flat)
    g0 = gates.gate(root).weight.grad.clone()
    assert torch.allclose(g0, g0[0].expand_as(g0))  # the paper's push: all tied
    assert float(g.sum()) == pytest.approx(float(g0.sum()), rel=1e-5)  # same total push on the group
    assert int(g.argmax()) == int(norms.argmin()) and int(g.argmin()) == int(norms.argmax())
    assert float(g.max() / g.min()) == pytest.approx(1.5 / 0.5, rel=1e-4)


def test_reconfigure_refuses_a_gated_model_it_cannot_reproduce(r20_input):
    model, gates = _r20(r20_input)
    _random_gates(gates)
    gates.handles[0].remove()  # one gate no longer applied: the gated network is not the one reconfigured
    with pytest.raises(UserError, match="does not compute"):
        reconfigure(model, gates, r20_input[:1])


def test_macs_input_counts_are_constant_by_default(r20_input):
    _, gates = _r20(r20_input)
    # layer1.0.conv1's private gate sets conv1's output count and conv2's input count
    private = gates.gate("layer1.0.conv1").weight

    def grad_of(flag: bool) -> torch.Tensor:
        private.grad = None
        reg = SPMRegularizer(gates, 0.5, alpha_nuc=0.0, alpha_mac=1.0, mac_norm="dense", mac_grad_inputs=flag,
                             tie_spread=0.0)
        reg.extra_loss().backward()
        return private.grad.clone()

    reg = SPMRegularizer(gates, 0.5)
    share = {lay.name: lay for lay in reg._layers}
    d_out = share["layer1.0.conv1"].macs / reg.dense_macs / 16  # d(MACs fraction)/d(one output channel)
    d_in = share["layer1.0.conv2"].macs / reg.dense_macs / 16  # ... /d(one input channel) of conv2
    expect = 2 * 1.0 * (1.0 - 0.5)  # d/d frac of alpha * (frac - target)^2 at all gates on
    assert torch.allclose(grad_of(False), torch.full((16,), expect * d_out), rtol=1e-5)
    assert torch.allclose(grad_of(True), torch.full((16,), expect * (d_out + d_in)), rtol=1e-5)


def test_freeze_stops_gate_updates(r20_input):
    model, gates = _r20(r20_input)
    reg = SPMRegularizer(gates, 0.3, alpha_mac=10.0, mac_norm="dense")
    nwd = {id(p) for p in reg.no_weight_decay_params()}
    rest = [p for p in model.parameters() if id(p) not in nwd]
    opt = torch.optim.SGD([{"params": rest, "weight_decay": 5e-4},
                           {"params": reg.no_weight_decay_params(), "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    x, y = r20_input, torch.tensor([0, 1, 2, 3])

    def step():
        loss = F.cross_entropy(model(x), y)
        extra = reg.extra_loss(None, model, None)
        opt.zero_grad(set_to_none=False)
        (loss if extra is None else loss + extra).backward()
        opt.step()
        reg.on_step_end(None)

    before = [p.detach().clone() for p in gates.parameters()]
    step()
    assert any(not torch.equal(a, b) for a, b in zip(before, gates.parameters()))
    reg.freeze()
    assert reg.extra_loss() is None
    frozen = [p.detach().clone() for p in gates.parameters()]
    w0 = rest[0].detach().clone()
    step()
    step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, gates.parameters()))  # momentum does not move them
    assert not torch.equal(w0, rest[0])  # the masked network trains on
    assert reg.state_dict()["frozen"] is True


def test_freeze_after_steps_and_epochs(r20_input):
    _, gates = _r20(r20_input)
    reg = SPMRegularizer(gates, 0.5, freeze_after=2)
    reg.on_step_end()
    assert not reg.frozen
    reg.on_step_end()
    assert reg.frozen and reg.metrics()["frozen"] == 1.0
    _, gates = _r20(r20_input)
    reg = SPMRegularizer(gates, 0.5, freeze_epoch=65)

    class Trainer:
        epoch = 64

    reg.on_epoch_end(Trainer())
    assert not reg.frozen
    Trainer.epoch = 65
    reg.on_epoch_end(Trainer())
    assert reg.frozen


def test_frozen_set_is_fixed_and_ddp_safe(r20_input, monkeypatch):
    import regprune.methods.spm as spm

    model, gates = _r20(r20_input)
    _random_gates(gates, seed=1)
    monkeypatch.setattr(spm, "_distributed", lambda: True)
    reg = SPMRegularizer(gates, 0.5)
    kept = gates.kept_widths()
    reg.freeze()
    # under DDP every gate stays a graph leaf with a zero gradient ...
    assert all(p.requires_grad for p in gates.parameters())
    model(r20_input).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in gates.parameters())
    # ... and whatever the optimizer does to the weights, the on/off set no longer moves
    with torch.no_grad():
        for p in gates.parameters():
            p.fill_(0.0)
    assert gates.kept_widths() == kept
    groups = reg.param_groups()
    assert groups[0]["weight_decay"] == 0.0 and groups[0]["lr_scale"] == 1.0 and len(groups[0]["params"]) == len(gates)


def test_state_dict_round_trip(r20_input):
    _, gates = _r20(r20_input)
    _random_gates(gates, seed=3)
    reg = SPMRegularizer(gates, 0.5)
    reg.extra_loss()
    reg.on_step_end()
    live = SPMRegularizer(*_r20(r20_input)[1:], 0.5)
    live.load_state_dict(reg.state_dict())  # a search in progress
    assert not live.frozen and live.kept_widths() == reg.kept_widths()
    assert all(p.requires_grad for p in live.gates.parameters())
    reg.freeze()
    kept = reg.kept_widths()
    with torch.no_grad():  # weights that drift after the freeze do not change the set
        for p in gates.parameters():
            p.add_(torch.randn(p.shape))
    assert reg.kept_widths() == kept
    state = reg.state_dict()
    _, gates2 = _r20(r20_input)
    reg2 = SPMRegularizer(gates2, 0.5)
    reg2.load_state_dict(state)
    assert reg2.frozen and reg2.steps == 1 and reg2.calls == 1
    assert all(not p.requires_grad for p in gates2.parameters())
    assert reg2.kept_widths() == kept and reg2.current_macs() == reg.current_macs()
    for r in gates.roots:
        assert torch.equal(gates.gate(r).weight, gates2.gate(r).weight)
    with pytest.raises(UserError):
        reg2.load_state_dict({**state, "gates": {}})


def test_bad_options(r20_input):
    _, gates = _r20(r20_input)
    for kw in ({"mac_norm": "gmac"}, {"nuc_every": 0}, {"mac_unit": 0.0}, {"gate_lr_scale": 0.0}, {"tie_spread": 1.0}):
        with pytest.raises(UserError):
            SPMRegularizer(gates, 0.5, **kw)
    with pytest.raises(UserError):
        SPMRegularizer(gates, 1.5)


def test_short_search_reaches_the_budget():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    reg = SPMRegularizer.attach(model, x[:1], 0.5, alpha_mac=20.0, mac_norm="dense", nuc_every=10)
    nwd = {id(p) for p in reg.no_weight_decay_params()}
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if id(p) not in nwd], "weight_decay": 5e-4},
                           {"params": reg.no_weight_decay_params(), "weight_decay": 0.0}], lr=0.05, momentum=0.9)
    fractions = []
    for _ in range(100):
        idx = torch.randint(0, 64, (8,))
        loss = F.cross_entropy(model(x[idx]), y[idx]) + reg.extra_loss(None, model, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.on_step_end(None)
        fractions.append(reg.current_macs() / reg.dense_macs)
    assert fractions[0] > 0.9
    assert abs(sum(fractions[-20:]) / 20 - 0.5) < 0.05
    reg.freeze()
    small = reconfigure(model, reg, x[:1])
    assert count_macs(small, x[:1]) / reg.dense_macs == pytest.approx(fractions[-1], abs=1e-6)


class _Tiny(torch.nn.Module):
    # not an nn.Sequential: the gates' ModuleDict hangs on the model, and a Sequential would run it as a layer
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _tiny() -> _Tiny:
    torch.manual_seed(0)
    return _Tiny()


def test_regularizer_spm_in_a_plain_loop_prunes_to_a_smaller_verified_model():
    import regprune
    from regprune.api import GateRegularizer

    model = _tiny()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    dense = count_macs(model, x[:1])
    reg = regprune.regularizer(model, x[:2], method="spm", target_macs=0.5, iters=10, alpha_mac=5.0,
                               mac_norm="dense", alpha_nuc=0.0)
    assert isinstance(reg, GateRegularizer) and hasattr(model, GATES_ATTR)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)  # built after: it holds the gates
    batches = [(x[idx], y[idx]) for idx in torch.randint(0, 32, (10, 8))]
    steps = regularize(reg, model, opt, batches)
    assert steps == 10 and reg.extra_loss() is None
    assert reg.status()["macs_fraction"] < 1.0 and reg.picks()
    model.eval()
    with torch.no_grad():
        gated = model(x)
    pruned = reg.prune(optimizer=opt)
    assert pruned is model and not hasattr(model, GATES_ATTR)
    assert count_macs(pruned, x[:1]) < dense
    with torch.no_grad():
        assert torch.allclose(pruned(x), gated, atol=1e-5, rtol=1e-4)
    # the optimizer follows the pruned parameters (gates dropped) and keeps training
    own = {id(p) for p in pruned.parameters()}
    assert all(id(p) in own for g in opt.param_groups for p in g["params"])
    pruned.train()
    F.cross_entropy(pruned(x[:8]), y[:8]).backward()
    opt.step()
    with pytest.raises(UserError, match="already pruned"):
        reg.prune()


def test_regularizer_spm_refuses_greg_options_and_leaves_the_model_ungated():
    import regprune

    model = _tiny()
    x = torch.randn(2, 1, 8, 8)
    for kwargs in ({"ratios": "*:0.5"}, {"unstructured": True}, {"speedup": 2.0, "target_macs": 0.5},
                   {"target_macs": 1.5}, {"bogus": 1}, {"iters": 0}):
        with pytest.raises(UserError):
            regprune.regularizer(model, x, method="spm", **kwargs)
        assert not hasattr(model, GATES_ATTR)
    reg = regprune.regularizer(model, x, method="spm", speedup=2.0)
    assert reg.spm.target_macs == pytest.approx(0.5) and not reg.done()


def test_every_method_follows_the_protocol(r20_input):
    import regprune
    from regprune.methods import GReg, L1Pruner, PruneTarget, PruningMethod

    model = _tiny()
    x = torch.randn(2, 1, 8, 8)
    targets = [PruneTarget("conv1", model.conv1, 2), PruneTarget("conv2", model.conv2, 4)]
    greg_model = copy.deepcopy(model)
    objs = [GReg(targets), L1Pruner(targets), SPMRegularizer.attach(copy.deepcopy(model), x, 0.5),
            regprune.regularizer(greg_model, x, "greg1", "*:0.5"),
            regprune.regularizer(copy.deepcopy(model), x, method="spm", target_macs=0.5)]
    for obj in objs:
        assert isinstance(obj, PruningMethod), type(obj).__name__
        obj.load_state_dict(obj.state_dict())
        assert isinstance(obj.picks(), dict) and isinstance(obj.done(), bool)
    assert not isinstance(object(), PruningMethod)
