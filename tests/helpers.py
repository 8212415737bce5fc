"""Small helpers shared by the tests."""

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from regprune.data.mnist import FASHION_MNIST_DEFAULT_PATH


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and shifts, so an ungated BN would turn a zeroed channel into its shift."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def regularize(reg, model: nn.Module, opt, batches, max_steps: int = 100_000) -> int:
    """The plain user loop the README shows: forward, the method's extra loss (if any), backward, `after_backward`,
    step, `on_step_end`, over `batches` ((x, y) pairs, cycled) until `reg.done()`. Returns the steps taken."""
    import torch.nn.functional as F

    steps = 0
    while not reg.done():
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            term = reg.extra_loss() if hasattr(reg, "extra_loss") else None
            if term is not None:
                loss = loss + term
            opt.zero_grad()
            loss.backward()
            reg.after_backward()
            opt.step()
            reg.on_step_end()
            steps += 1
            assert steps < max_steps, "the regularizer never finished"
            if reg.done():
                break
    return steps


# ---- benchmark scripts (benchmarks/*.py are scripts, not a package: loaded by path)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DEFAULT_PATH),
                                   reason="Debian package dataset-fashion-mnist not installed")


def load_benchmark(name: str):
    """Import benchmarks/<name>.py as module bench_<name>."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def finite(x) -> bool:
    """A real finite number (bools do not count)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
