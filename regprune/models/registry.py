"""One registry for every architecture: `create_model(name)` and `list_models(pattern)`."""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from ..errors import UserError
from .cifar import CifarResNet, CifarVGG

__all__ = ["create_model", "list_models", "register_model", "model_info", "ModelInfo", "Published"]


@dataclass(frozen=True)
class Published:
    """An architecture's size as its authors published it: parameters and multiply-accumulates of one forward
    at `input_size` x `input_size` with `num_classes` outputs (one MAC = one FLOP in torchvision's convention;
    papers that count a multiply and an add as two FLOPs are halved)."""

    params: int
    macs: int | None
    input_size: int
    num_classes: int
    source: str
    build_kwargs: dict = field(default_factory=dict)  # what create_model needs to build the published variant


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the tool needs to know about a named architecture."""

    name: str
    family: str  # "cifar_resnet", "cifar_vgg", "torchvision" or "timm"
    input_size: int  # native square input side
    builder: Callable[..., nn.Module]
    published: Published | None = None  # None: no published figure


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, family: str, input_size: int, published: Published | None = None) -> Callable:
    """Decorator adding a builder `fn(num_classes, in_channels, **kw) -> nn.Module` under `name`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = ModelInfo(name, family, input_size, fn, published)
        return fn

    return deco


_HE2016 = "He et al., Deep Residual Learning, CVPR 2016 (Table 6 params); MACs as cited by CIFAR pruning papers"
# depth: (params, MACs) at 32x32, 10 classes, option-A shortcuts
_CIFAR_RESNET_SIZES = {20: (0.27e6, 41e6), 32: (0.46e6, 69e6), 44: (0.66e6, 97e6), 56: (0.85e6, 125e6),
                       110: (1.7e6, 253e6)}
_CIFAR_VGG_SIZES = {  # depth: (params, MACs, source) at 32x32, 10 classes
    16: (15e6, 313e6, "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017 (Table 1: 1.5e7, 3.13e8)"),
    19: (20.04e6, 398.5e6, "Liu et al., Network Slimming, ICCV 2017 (Table 1: 20.04M, 7.97e8 FLOPs = 2 x MACs)"),
}


def _register_cifar() -> None:
    for depth in (20, 32, 44, 56, 110):
        p, m = _CIFAR_RESNET_SIZES[depth]
        register_model(f"resnet{depth}", "cifar_resnet", 32, Published(int(p), int(m), 32, 10, _HE2016))(
            lambda num_classes=10, in_channels=3, shortcut="A", _d=depth: CifarResNet(_d, num_classes, in_channels, shortcut)
        )
    for depth in (11, 13, 16, 19):
        pub = _CIFAR_VGG_SIZES.get(depth)
        register_model(f"vgg{depth}", "cifar_vgg", 32, pub and Published(int(pub[0]), int(pub[1]), 32, 10, pub[2]))(
            lambda num_classes=10, in_channels=3, _d=depth: CifarVGG(_d, num_classes, in_channels)
        )


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def _build_torchvision(name: str, num_classes: int = 1000, in_channels: int = 3, weights: str | None = None,
                       **kwargs) -> nn.Module:
    """A torchvision classifier; `kwargs` go to its builder (e.g. googlenet's aux_logits)."""
    from torchvision import models as tvm

    if weights is None:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    else:
        model = tvm.get_model(name, weights=weights, **kwargs)
    if weights is not None and num_classes != 1000:
        raise UserError(f"pretrained weights for torchvision.{name} have 1000 classes, not {num_classes}")
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


@functools.lru_cache(maxsize=None)
def _torchvision_published(name: str) -> Published | None:
    """Params and MACs from torchvision's weight metadata (`num_params`, `_ops` in GFLOPS = GMACs), read from
    the weights enum (nothing is downloaded): the weights with the smallest crop size, the first of those."""
    from torchvision import models as tvm

    try:
        weights = list(tvm.get_model_weights(name))
    except (ValueError, KeyError):
        return None
    if not weights:
        return None
    crop = lambda w: (w.transforms.keywords or {}).get("crop_size", 224)  # noqa: E731
    w = min(weights, key=crop)  # min keeps the first of equal sizes: enum order
    ops = w.meta.get("_ops")
    return Published(int(w.meta["num_params"]), None if ops is None else round(ops * 1e9), int(crop(w)),
                     len(w.meta["categories"]), f"torchvision weights {type(w).__name__}.{w.name}",
                     # the released GoogLeNet drops its training-time auxiliary classifiers
                     {"aux_logits": False} if name == "googlenet" else {})


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
            return ModelInfo(name, "torchvision", size, lambda _tv=tv, **kw: _build_torchvision(_tv, **kw),
                             _torchvision_published(tv))
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
