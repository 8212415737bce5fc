"""regprune: structured pruning of PyTorch networks by regularization, ending in a smaller dense model."""

from .errors import UserError
from .models import create_model, list_models
from .api import PruneResult, Regularizer, prune, regularizer
from .engine.bn_recal import recalibrate_bn
from .surgery import load_model as load
from .surgery import save_model as save

__version__ = "0.1.0"
__all__ = ["recalibrate_bn", "UserError", "create_model", "list_models", "load", "save", "prune", "regularizer", "Regularizer",
           "PruneResult", "__version__"]
