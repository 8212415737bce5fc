"""Small helpers shared by the tests."""

import torch
import torch.nn as nn


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and shifts, so an ungated BN would turn a zeroed channel into its shift."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
