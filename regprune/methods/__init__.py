"""Pruning methods: each a small object with hooks the training engine calls."""

from .base import PruneTarget

__all__ = ["PruneTarget"]
