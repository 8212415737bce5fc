"""One registry for every architecture: `create_model(name)` and `list_models(pattern)`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..errors import UserError
from .cifar import CifarResNet, CifarVGG

__all__ = ["create_model", "list_models", "register_model", "model_info", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the tool needs to know about a named architecture."""

    name: str
    family: str  # "cifar_resnet", "cifar_vgg", "torchvision" or "timm"
    input_size: int  # native square input side
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, family: str, input_size: int) -> Callable:
    """Decorator adding a builder `fn(num_classes, in_channels, **kw) -> nn.Module` under `name`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelInfo(name, family, input_size, fn)
        return fn

    return deco


def _register_cifar() -> None:
    for depth in (20, 32, 44, 56, 110):
        register_model(f"resnet{depth}", "cifar_resnet", 32)(
            lambda num_classes=10, in_channels=3, shortcut="A", _d=depth: CifarResNet(_d, num_classes, in_channels, shortcut)
        )
    for depth in (11, 13, 16, 19):
        register_model(f"vgg{depth}", "cifar_vgg", 32)(
            lambda num_classes=10, in_channels=3, _d=depth: CifarVGG(_d, num_classes, in_channels)
        )


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def _build_torchvision(name: str, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None) -> nn.Module:
    from torchvision import models as tvm

    model = tvm.get_model(name, weights=weights, num_classes=num_classes) if weights is None else tvm.get_model(name, weights=weights)
    if weights is not None and num_classes != 1000:
        raise UserError(f"pretrained weights for torchvision.{name} have 1000 classes, not {num_classes}")
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, 1 if child.groups == 1 else in_channels, child.bias is not None)
                setattr(parent, cname, new)
                return


def _timm_names() -> list[str]:
    """timm's architectures (empty without the optional `timm` extra)."""
    try:
        import timm
    except ImportError:
        return []
    return sorted(timm.list_models())


def _timm_input_size(name: str) -> int:
    """The square input side of timm's default configuration for `name` (224 when it names none)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        return int(size[-1]) if size else 224
    except Exception:  # an architecture without a default configuration
        return 224


def _build_timm(name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """A timm architecture, freshly initialised (nothing is downloaded: pretrained weights are never asked)."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as exc:
        raise UserError(f"timm.{name} does not take these arguments: {exc}") from None


_register_cifar()


def list_models(pattern: str | None = None) -> list[str]:
    """All model names, optionally filtered by a glob pattern (`resnet*`, `torchvision.mobilenet*`)."""
    names = sorted(_REGISTRY) + [f"torchvision.{n}" for n in _torchvision_names()]
    if pattern is None or pattern.startswith(("timm", "*")):
        names += [f"timm.{n}" for n in _timm_names()]
    return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]


def model_info(name: str) -> ModelInfo:
    """Registry entry for `name`; raises UserError for unknown names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("torchvision."):
        tv = name.split(".", 1)[1]
        if tv in _torchvision_names():
            size = 299 if tv == "inception_v3" else 224
            return ModelInfo(name, "torchvision", size, lambda _tv=tv, **kw: _build_torchvision(_tv, **kw))
    if name.startswith("timm."):
        tm = name.split(".", 1)[1]
        names = _timm_names()
        if not names:
            raise UserError(f"{name} needs timm: pip install 'regprune[timm]'")
        if tm in names:
            return ModelInfo(name, "timm", _timm_input_size(tm), lambda _tm=tm, **kw: _build_timm(_tm, **kw))
    hint = ", ".join(sorted(_REGISTRY)) + ", torchvision.<name>, timm.<name>"
    raise UserError(f"unknown model {name!r}; known: {hint} (see `regprune models`)")


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a freshly initialised model by name; the returned module remembers how it was built."""
    info = model_info(name)
    if info.family in ("torchvision", "timm") and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    elif info.family not in ("torchvision", "timm"):
        kwargs["num_classes"] = num_classes
    model = info.builder(in_channels=in_channels, **kwargs)
    arch_kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    arch_kwargs["in_channels"] = in_channels
    model.regprune_arch = {"name": name, "kwargs": arch_kwargs}
    return model
