"""Architectures by name."""

from .cifar import BasicBlock, CifarResNet, CifarVGG, PadShortcut
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["create_model", "list_models", "model_info", "register_model", "ModelInfo",
           "CifarResNet", "CifarVGG", "BasicBlock", "PadShortcut"]
