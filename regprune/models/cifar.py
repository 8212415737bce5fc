"""CIFAR-style ResNets (He et al. 2016, option-A/B shortcuts) and VGG with BatchNorm."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PadShortcut", "BasicBlock", "CifarResNet", "CifarVGG", "VGG_CFGS"]


class PadShortcut(nn.Module):
    """Parameter-free option-A shortcut: subsample spatially and place input channels into the output.

    `index[j]` names the input channel copied to output channel `j`, or -1 for a zero channel. With the
    papers' layout this equals ``F.pad(x[:, :, ::2, ::2], (0,0,0,0,p,p))``; holding the mapping as a
    buffer lets pruning remove channels on either side and keep the function exact.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride
        pad = (out_planes - in_planes) // 2
        index = torch.full((out_planes,), -1, dtype=torch.long)
        index[pad:pad + in_planes] = torch.arange(in_planes)
        self.register_buffer("index", index)
        self.in_planes = in_planes

    @property
    def out_planes(self) -> int:
        return int(self.index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        # one zero channel appended at the end; -1 entries select it
        x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
        idx = torch.where(self.index < 0, torch.full_like(self.index, x.shape[1] - 1), self.index)
        return torch.index_select(x, 1, idx)

    def extra_repr(self) -> str:
        return f"in_planes={self.in_planes}, out_planes={self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = PadShortcut(in_planes, planes, stride)
            elif option == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                raise ValueError(f"unknown shortcut option {option!r} (expected 'A' or 'B')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 16/32/64 channels in three stages (`width`/2x/4x with `width`)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, option: str = "A",
                 width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if width < 1:
            raise ValueError(f"CIFAR ResNet width must be >= 1, got {width}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        stages = []
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, option))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


VGG_CFGS: dict[int, list] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 images: conv stack, global average pool, one Linear."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
