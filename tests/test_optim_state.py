"""Optimizer state across pruning: kept indices of every pruned parameter, rebinding SGD and Adam."""

import copy

import pytest
import torch
import torch.nn as nn

from regprune.errors import UserError
from regprune.graph import analyze
from regprune.optim_state import kept_indices, rebind_optimizer
from regprune.surgery import apply_picks

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")


class Plain(nn.Module):
    """conv-BN-ReLU-conv-pool-linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Grouped(nn.Module):
    """conv -> grouped conv (2 groups) -> BN -> ReLU -> conv -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.gconv(torch.relu(self.conv1(x)))))
        return self.fc(self.conv3(x).mean((2, 3)))


class Shifted(nn.Module):
    """conv -> + per-channel parameter (1, C, 1, 1) -> ReLU -> conv -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x) + self.shift))
        return self.fc(x.mean((2, 3)))


def _keep(n, drop):
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


# model, picks, and the slicing they imply written out by hand: name -> [(dim, kept positions), ...]
K8, K6 = _keep(8, [1, 4, 6]), _keep(6, [0, 5])
CASES = {
    "plain": (Plain, {"conv1": [1, 4, 6], "conv2": [0, 5]}, {
        "conv1.weight": [(0, K8)], "conv1.bias": [(0, K8)], "bn.weight": [(0, K8)], "bn.bias": [(0, K8)],
        "conv2.weight": [(0, K6), (1, K8)], "conv2.bias": [(0, K6)], "fc.weight": [(1, K6)]}),
    # conv1 loses position 1 of each of gconv's input blocks of 4; gconv loses position 0 of each output block
    "grouped": (Grouped, {"conv1": [1, 5], "gconv": [0, 4]}, {
        "conv1.weight": [(0, _keep(8, [1, 5]))], "conv1.bias": [(0, _keep(8, [1, 5]))],
        "gconv.weight": [(0, _keep(8, [0, 4])), (1, _keep(4, [1]))], "gconv.bias": [(0, _keep(8, [0, 4]))],
        "bn.weight": [(0, _keep(8, [0, 4]))], "bn.bias": [(0, _keep(8, [0, 4]))],
        "conv3.weight": [(1, _keep(8, [0, 4]))]}),
    "shifted": (Shifted, {"conv1": [0, 7], "conv2": [2]}, {
        "conv1.weight": [(0, _keep(8, [0, 7]))], "conv1.bias": [(0, _keep(8, [0, 7]))],
        "shift": [(1, _keep(8, [0, 7]))],
        "conv2.weight": [(0, _keep(6, [2])), (1, _keep(8, [0, 7]))], "conv2.bias": [(0, _keep(6, [2]))],
        "fc.weight": [(1, _keep(6, [2]))]}),
}
X = torch.randn(4, 3, 8, 8)


def _by_hand(t: torch.Tensor, ops) -> torch.Tensor:
    for dim, idx in ops:
        t = t.index_select(dim, idx)
    return t


def _model(cls, seed=0):
    torch.manual_seed(seed)
    return cls()


def _make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(params, lr=0.01, weight_decay=1e-3, amsgrad=True)


def _train(model, opt, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, 8, 8, generator=g)
        model(x).square().mean().backward()
        opt.step()


def _prune_with(model, picks, opt):
    """The pruning sequence a training loop follows; returns (old params, kept, rebound count)."""
    old = dict(model.named_parameters())
    kept = kept_indices(model, X[:1], picks)
    apply_picks(analyze(model, X[:1]), picks)
    return old, kept, rebind_optimizer(opt, old, model, kept)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_indices_are_the_surviving_entries(case):
    cls, picks, slicing = CASES[case]
    model = _model(cls)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    kept = kept_indices(model, X[:1], picks)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: t.shape for n, t in dense.items()}  # untouched
    assert set(kept) == set(slicing)
    apply_picks(analyze(model, X[:1]), picks)
    for name, p in model.named_parameters():
        if name in kept:
            assert kept[name].dtype == torch.long and kept[name].numel() == p.numel()
            assert torch.equal(dense[name].reshape(-1)[kept[name]].view(p.shape), p.detach()), name
            assert torch.equal(_by_hand(dense[name], slicing[name]), p.detach()), name
        else:
            assert p.shape == dense[name].shape


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rebind_slices_state_and_holds_every_parameter_once(case, kind):
    cls, picks, slicing = CASES[case]
    model = _model(cls)
    opt = _make_opt(kind, model.parameters())
    _train(model, opt)
    before = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
              for n, p in model.named_parameters()}
    old, kept, count = _prune_with(model, picks, opt)

    new = dict(model.named_parameters())
    replaced = {n for n in new if new[n] is not old[n]}
    assert replaced >= set(slicing) and count == len(replaced)
    held = [p for group in opt.param_groups for p in group["params"]]
    assert len(held) == len(new) and {id(p) for p in held} == {id(p) for p in new.values()}
    assert {id(p) for p in opt.state} == {id(p) for p in new.values()}  # no state left on dead tensors
    for name, p in new.items():
        state = opt.state[p]
        assert set(state) == set(before[name])
        for key, val in state.items():
            if torch.is_tensor(val) and val.dim() > 0:
                want = _by_hand(before[name][key], slicing.get(name, []))
                assert val.shape == p.shape and torch.equal(val, want), (name, key)
            else:
                assert val == before[name][key], (name, key)  # Adam's step count
        if name not in slicing:
            assert p is old[name]  # unchanged by pruning: the same object

    snapshot = {n: p.detach().clone() for n, p in new.items()}
    _train(model, opt, steps=1, seed=2)
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), snapshot[name]), f"{name} did not move"


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_after_rebind_equals_a_fresh_optimizer_with_the_sliced_state(case, kind):
    cls, picks, slicing = CASES[case]
    model = _model(cls)
    opt = _make_opt(kind, model.parameters())
    _train(model, opt)
    old_state = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                 for n, p in model.named_parameters()}
    _prune_with(model, picks, opt)

    twin = copy.deepcopy(model)
    names = [n for n, _ in twin.named_parameters()]
    fresh = _make_opt(kind, twin.parameters())
    sliced = {i: {k: (_by_hand(v, slicing.get(n, [])) if torch.is_tensor(v) and v.dim() > 0 else v)
                  for k, v in old_state[n].items()} for i, n in enumerate(names)}
    groups = fresh.state_dict()["param_groups"]
    fresh.load_state_dict({"state": sliced, "param_groups": groups})

    _train(model, opt, steps=2, seed=3)
    _train(twin, fresh, steps=2, seed=3)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
        assert set(opt.state[p]) == set(fresh.state[q])
        for key, val in opt.state[p].items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(fresh.state[q][key])), (name, key)


def test_param_groups_keep_their_settings():
    model = _model(Plain)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-3}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)
    _train(model, opt)
    _prune_with(model, CASES["plain"][1], opt)
    new = dict(model.named_parameters())
    assert [p for p in opt.param_groups[0]["params"]] == [new[n] for n in new if n.endswith("weight")]
    assert [p for p in opt.param_groups[1]["params"]] == [new[n] for n in new if n.endswith("bias")]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]


def test_state_before_the_first_step_and_rebinding_twice():
    model = _model(Plain)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    old, kept, count = _prune_with(model, CASES["plain"][1], opt)
    assert count == 7 and not opt.state  # nothing to slice yet: only the parameters change
    assert rebind_optimizer(opt, old, model, kept) == 0  # already the pruned model's parameters
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}


def test_foreign_parameter_or_missing_indices_raise():
    model = _model(Plain)
    stranger = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD(list(model.parameters()) + [stranger], lr=0.1, momentum=0.9)
    with pytest.raises(UserError, match="neither among the old parameters nor in the pruned model"):
        _prune_with(model, CASES["plain"][1], opt)

    model = _model(Plain)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt)
    old = dict(model.named_parameters())
    apply_picks(analyze(model, X[:1]), CASES["plain"][1])
    with pytest.raises(UserError, match="no kept indices for conv1.weight"):
        rebind_optimizer(opt, old, model, {})


def test_probe_does_not_touch_the_model_and_handles_float32_inputs_and_tuples():
    model = _model(Shifted)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    kept = kept_indices(model, (X[:1],), {"conv1": [3]})
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert kept["shift"].tolist() == [0, 1, 2, 4, 5, 6, 7]
    with pytest.raises(UserError, match="cannot remove all"):
        kept_indices(model, X[:1], {"conv1": list(range(8))})
