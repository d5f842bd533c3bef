"""Adaptive ViT methods; importing this package registers every implemented method."""
from .base import AdaptiveViT, LossOutput, Prediction, TrainingPhase
from .registry import (create_model, create_model_from_config, list_methods, list_models, load_model, register_method,
                       save_model)
from . import dense  # noqa: F401  (registers "dense")
from . import dynamicvit  # noqa: F401  (registers "dynamicvit")
from . import dvt  # noqa: F401  (registers "dvt")
from . import revit  # noqa: F401  (registers "revit")
from . import tome  # noqa: F401  (registers "tome")
from . import evit  # noqa: F401  (registers "evit")
from . import adavit  # noqa: F401  (registers "adavit")

__all__ = ["AdaptiveViT", "LossOutput", "Prediction", "TrainingPhase", "create_model",
           "create_model_from_config", "list_methods", "list_models", "load_model", "register_method", "save_model"]
