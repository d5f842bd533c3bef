"""dyntok: input-adaptive Vision Transformers on current PyTorch and timm, measured for real."""
from ._versions import warn_if_untested

warn_if_untested()

from .methods import (AdaptiveViT, LossOutput, Prediction, TrainingPhase, create_model, create_model_from_config,
                      list_methods, list_models, register_method)
from .checkpoint import load_model, save_model
from .adapt import adapt
from .convert import convert
from .report.gallery import show

__version__ = "0.1.0"

__all__ = ["AdaptiveViT", "adapt", "convert", "LossOutput", "Prediction", "TrainingPhase", "create_model",
           "create_model_from_config", "list_methods", "list_models", "load_model", "register_method",
           "save_model", "show", "__version__"]
