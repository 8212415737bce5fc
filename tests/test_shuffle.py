"""Channel shuffle (ShuffleNetV2): the tracer maps the view -> transpose -> view permutation exactly, the channels
inside each branch (1x1 -> depthwise -> 1x1) are pruned and verified, and every group whose channels cross a
shuffle is refused with the reason."""

import pytest
import torch
import torch.nn as nn
from torchvision.models.shufflenetv2 import channel_shuffle

import regprune
from regprune import UserError, create_model
from regprune.channel_maps import shuffles
from regprune.counting import count_macs
from regprune.graph import GroupGraph, analyze


def _permute_reshape(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _transpose_flatten(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).flatten(1, 2)


SHUFFLES = {"view-transpose-view": channel_shuffle, "permute-reshape": _permute_reshape,
            "transpose-flatten": _transpose_flatten}


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 stride-1 unit between a stem and a head: split the stem's 8 channels in two, 1x1 (4 -> 6)
    -> depthwise 3x3 -> 1x1 (6 -> 4) on the second half, concat, then a channel shuffle of `groups` parts."""

    def __init__(self, shuffle=channel_shuffle, groups=2):
        super().__init__()
        self.shuffle, self.groups = shuffle, groups
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
                                    nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6),
                                    nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x1, x2 = self.stem(x).chunk(2, dim=1)
        x = self.shuffle(torch.cat([x1, self.branch(x2)], 1), self.groups)
        return self.fc(torch.relu(self.head(x)).mean((2, 3)))


def _head_inputs(graph, root, idxs):
    """{root channel: head input channel} of the group that removes `idxs` of `root`."""
    group = graph.tp_group(root, idxs)
    for item in group:
        reads = not graph.dg.is_out_channel_pruning_fn(item.dep.handler)
        if reads and graph.names.get(item.dep.target.module) == "head":
            return dict(zip(item.root_idxs, item.idxs))
    return {}


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("spelling", list(SHUFFLES))
def test_shuffle_permutation_is_mapped_exactly(spelling, groups):
    shuffle = SHUFFLES[spelling]
    m, x = ShuffleUnit(shuffle, groups), torch.randn(1, 3, 8, 8)
    g = GroupGraph(m, x, safety=False)
    (sh,) = shuffles(g.dg)
    assert (sh.groups, sh.channels) == (groups, 8)
    # ground truth: which concat channel each position after the shuffle holds
    source = shuffle(torch.arange(8.0).view(1, 8, 1, 1), groups).flatten().long().tolist()
    assert sh.perm == [source.index(c) for c in range(8)]
    # the branch output's channel j is concat channel 4 + j; the stem's channels 0-3 pass the split's first part
    assert _head_inputs(g, "branch.5", [0, 1, 2, 3]) == {j: source.index(4 + j) for j in range(4)}
    assert _head_inputs(g, "stem.0", list(range(8))) == {c: source.index(c) for c in range(4)}
    readers = {g.names[i.dep.target.module]: list(i.idxs) for i in g.tp_group("stem.0", [5, 6])
               if i.dep.target.module in g.names and not g.dg.is_out_channel_pruning_fn(i.dep.handler)}
    assert readers == {"branch.0": [1, 2]}  # the second part feeds the branch, not the head


def test_branch_inner_width_prunes_verified_and_shuffled_groups_are_refused():
    m, x = ShuffleUnit(), torch.randn(1, 3, 8, 8)
    g = analyze(m, x, include_coupled=True)
    inner = g.group_of("branch.0")
    assert inner.in_scope and inner.kind == "block-internal" and inner.channels == 6
    assert {(mb.name, mb.side) for mb in inner.members if mb.kind == "Conv2d"} == {
        ("branch.0", "out"), ("branch.3", "out"), ("branch.5", "in")}
    for root in ("stem.0", "branch.5"):  # their channels cross the shuffle
        grp = g.group_of(root)
        assert grp.unsafe and not grp.in_scope
        assert grp.reason.startswith("unsafe: its channels pass a channel shuffle (8 channels interleaved from 2 parts")
    res = regprune.prune(m, x, ratios="branch.0:0.5")
    assert res.verification["verified"] and res.verification["modes"] == ["eval", "train"]
    assert (res.model.branch[0].out_channels, res.model.branch[3].groups, res.model.branch[5].in_channels) == (3, 3, 3)
    with pytest.raises(UserError, match=r"'stem.0' matches no prunable layer \(matches stem.0: unsafe: its channels"):
        regprune.prune(ShuffleUnit(), x, ratios="stem.0:0.5")


@pytest.mark.parametrize("name", ["torchvision.shufflenet_v2_x0_5"])
def test_torchvision_shufflenet_reaches_2x_verified(name, one_thread):
    torch.manual_seed(0)
    m = create_model(name, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    g = analyze(m, x)
    assert len(shuffles(g.dg)) == 16  # one per unit
    inner = [grp for grp in g.groups.values() if grp.root.endswith("branch2.3")]
    assert len(inner) == 16 and all(grp.in_scope and grp.kind == "block-internal" for grp in inner)
    crossing = [grp for grp in g.groups.values() if grp.root.endswith(("branch2.5", "branch1.2"))]
    assert len(crossing) == 19 and all("channel shuffle" in grp.reason and grp.unsafe for grp in crossing)
    assert g.groups["conv1.0"].in_scope  # the stem's channels reach no shuffle before the first unit's convs
    res = regprune.prune(m, x, speedup=2.0)
    assert res.verification["verified"] and res.verification["max_rel_diff"] <= 1e-6
    assert abs(count_macs(m, x) / count_macs(res.model, x) - 2.0) <= 0.04
    assert res.model.eval()(x).shape == (1, 10)
