"""Pruning methods: each a small object with hooks the training engine calls."""

from .base import Picks, PruneTarget, PruningMethod
from .greg import GREG_METHODS, GReg, GRegConfig, MaskKeeper
from .spm import ChannelGate, GateSet, SPMRegularizer, insert_gates
from .l1 import PICK_MODES, L1Pruner, filter_scores, pick_filters, select_indices

__all__ = ["PruneTarget", "Picks", "PruningMethod", "GReg", "GRegConfig", "MaskKeeper", "GREG_METHODS", "L1Pruner",
           "filter_scores", "pick_filters", "select_indices", "PICK_MODES",
           "ChannelGate", "GateSet", "SPMRegularizer", "insert_gates"]
