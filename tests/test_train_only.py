"""Layers that run only in train mode (auxiliary heads): the groups they read leave the scope before the safety
trial, with the reason, so the trial of the others runs on one copy; the trial alone finds the same groups."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import regprune
import regprune.graph as graph_mod
import regprune.probe as probe_mod
import regprune.verify as verify_mod
from regprune.graph import analyze


class AuxHeadNet(nn.Module):
    """A stem, two branches joined by a concat, and an auxiliary head reading the concat in train mode only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.branch_a = nn.Conv2d(8, 8, 1)
        self.branch_b = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1)
        self.bn_mix = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 10))

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], 1)
        aux = self.aux(x) if self.training else None
        x = self.head(F.relu(self.bn_mix(self.mix(x))))
        out = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return (out, aux) if self.training else out


@pytest.fixture
def trials(monkeypatch):
    """Counts the trial copies the safety trial traces (a fresh cache: nothing is remembered from other tests)."""
    n = {"copies": 0}
    factory = graph_mod.trial_graph

    def counted(*args, **kwargs):
        n["copies"] += 1
        return factory(*args, **kwargs)

    monkeypatch.setattr(graph_mod, "trial_graph", counted)
    monkeypatch.setattr(verify_mod, "_CACHE", {})
    return n


def test_groups_read_in_train_mode_only_leave_the_scope_without_bisection(trials):
    torch.manual_seed(0)
    m = AuxHeadNet()
    x = torch.randn(1, 3, 16, 16)
    g = analyze(m, x)
    assert {"aux", "aux.0", "aux.4"} <= g.train_only
    assert g.train_readers["branch_a"] == g.train_readers["branch_b"] == {"aux.0"}
    for root in ("branch_a", "branch_b"):
        grp = g.groups[root]
        assert not grp.in_scope and grp.unsafe and grp.kind == "unsafe"
        assert grp.reason == ("unsafe: read by layers that run only in train mode (aux.0): the trace never saw them")
    assert {grp.root for grp in g.scope()} == {"stem", "mix"}
    assert trials["copies"] == 1  # the trial of the rest passes on one copy: no bisection

    res = regprune.prune(m, x, ratios="0.5")
    assert res.verification["verified"] and res.verification["modes"] == ["eval", "train"]
    assert set(res.picks) == {"stem", "mix"}
    assert res.model.stem.out_channels == 4 and res.model.mix.out_channels == 8
    assert res.model.branch_a.out_channels == 8 and res.model.aux[0].in_channels == 16
    res.model.train()
    out, aux = res.model(torch.randn(2, 3, 16, 16))
    assert out.shape == aux.shape == (2, 10)


def test_the_trial_alone_finds_the_same_groups(trials, monkeypatch):
    """Without the up-front walk the trial's bisection finds the same groups unsafe (on more copies)."""
    train_pass = probe_mod._train_pass
    monkeypatch.setattr(probe_mod, "_train_pass", lambda *a: (train_pass(*a)[0], {}))
    torch.manual_seed(0)
    g = analyze(AuxHeadNet(), torch.randn(1, 3, 16, 16))
    unsafe = {grp.root for grp in g.groups.values() if grp.unsafe}
    assert unsafe == {"branch_a", "branch_b"}
    assert all("train mode: the pruned model fails" in g.groups[r].reason for r in unsafe)
    assert trials["copies"] > 1


def test_a_model_failing_in_train_mode_has_no_train_only_readers():
    class EvalOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.aux = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.conv2(F.relu(self.conv1(x)))
            if self.training:
                raise RuntimeError("eval only")
            return x

    g = analyze(EvalOnly(), torch.randn(1, 3, 8, 8))
    assert g.train_only == set() and g.train_readers == {}
