"""The prune job's option checks: the run, --dry-run and the Python path refuse the same mistakes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from regprune.errors import UserError
from regprune.graph import analyze
from regprune.jobs import JobOptions, greg_config, prune_plan
from regprune.jobs.plan import prune_plan_text
from regprune.jobs.prune import check_plan_options
from regprune.ratios import make_plan


def _opts(**kw) -> JobOptions:
    return JobOptions.from_dict({"model": "resnet20", "data": "digits", "base": "random", **kw})


def test_greg_momentum_must_be_the_optimizers() -> None:
    with pytest.raises(UserError, match="--momentum"):
        greg_config(_opts(method="greg1", speedup=2.0, greg={"momentum": 0.5}), 1)
    with pytest.raises(UserError, match="--momentum"):
        greg_config(_opts(method="greg1", speedup=2.0, reg_iters=500, greg={"momentum": 0.5}), 1)
    # the same value is no conflict, and --momentum is what the schedule follows
    assert greg_config(_opts(method="greg1", speedup=2.0, greg={"momentum": 0.9}), 1).momentum == 0.9
    assert greg_config(_opts(method="greg1", speedup=2.0, momentum=0.5), 1).momentum == 0.5


def test_greg_lr_is_not_a_setting() -> None:
    for extra in ({}, {"reg_iters": 500}):
        with pytest.raises(UserError, match="use lr_prune"):
            greg_config(_opts(method="greg1", speedup=2.0, greg={"lr": 0.01}, **extra), 1)
        with pytest.raises(UserError, match="use lr_prune"):
            greg_config(_opts(method="greg1", speedup=2.0, greg={"lr": 0.01, "lr_prune": 0.02}, **extra), 1)
    # an lr that repeats lr_prune says nothing new
    assert greg_config(_opts(method="greg1", speedup=2.0, greg={"lr": 0.01, "lr_prune": 0.01}), 1).lr_prune == 0.01


@pytest.mark.parametrize("kw, flag", [({"penalty": "group"}, "--penalty group"),
                                      ({"penalize_coupled": True}, "--penalty group"),
                                      ({"greg": {"update_reg_interval": 5}}, "--greg"),
                                      ({"reg_iters": 100}, "--reg-iters"),
                                      ({"reg_batch_size": 32}, "--reg-batch-size")])
def test_greg_options_refused_with_l1(kw, flag) -> None:
    o = _opts(method="l1", speedup=2.0, **kw)
    with pytest.raises(UserError, match="no regularization phase") as err:
        check_plan_options(o)
    assert flag in str(err.value)
    with pytest.raises(UserError, match="no regularization phase"):
        prune_plan_text(o)
    check_plan_options(_opts(method="greg1", speedup=2.0, **kw))  # fine with GReg


@pytest.mark.parametrize("kw, text", [({"ratios": "0.5"}, "not both"), ({"speedup": 2.0}, "not both"),
                                      ({"target_macs": 0.5}, "not both"), ({"round_to": 8}, "--round-to"),
                                      ({"include_coupled": True}, "--include-coupled")])
def test_sparsity_with_filter_plan_options_refused_everywhere(kw, text) -> None:
    o = _opts(method="greg1", unstructured=True, sparsity=0.8, **kw)
    for check in (check_plan_options, prune_plan_text,
                  lambda o: prune_plan(o, torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3)), torch.zeros(1, 1, 8, 8))):
        with pytest.raises(UserError, match=text):
            check(o)


def test_dry_run_refuses_what_the_run_refuses() -> None:
    with pytest.raises(UserError, match="greg1 and greg2"):
        prune_plan_text(_opts(method="l1", unstructured=True, sparsity=0.999, base=None))
    with pytest.raises(UserError, match="--bn-recal"):
        prune_plan_text(_opts(method="l1", speedup=2.0, bn_recal=-1, base=None))
    with pytest.raises(UserError, match="unknown lr schedule"):
        prune_plan_text(_opts(method="l1", speedup=2.0, ft_lr_schedule="exponential", base=None))


def test_unstructured_dry_run_table_shows_what_the_run_zeroes() -> None:
    text = prune_plan_text(_opts(method="greg1", unstructured=True, sparsity=0.999, base=None))
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].isdigit():
            rows[cells[0]] = (int(cells[1]), int(cells[2]))
    assert rows["conv1"] == (144, 143)  # ceil(0.999 * 144) = 144, but one weight stays
    for n, zeroed in rows.values():
        assert zeroed == min(math.ceil(0.999 * n - 1e-9), n - 1)


class _OnlyCoupled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.b(self.c(x)).mean((2, 3)))


def test_ratio_spec_on_an_empty_scope_names_include_coupled() -> None:
    graph = analyze(_OnlyCoupled(), torch.zeros(1, 3, 8, 8))
    assert not graph.scope()
    for kw in ({"spec": "0.5"}, {"speedup": 2.0}):
        with pytest.raises(UserError, match="nothing to prune") as err:
            make_plan(graph, **kw)
        assert "include-coupled" in str(err.value) and "include_coupled" in str(err.value)
