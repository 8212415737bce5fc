"""regprune: structured pruning of PyTorch networks by regularization, ending in a smaller dense model."""

from .errors import UserError
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["UserError", "create_model", "list_models", "__version__"]
