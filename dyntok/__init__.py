"""dyntok: input-adaptive Vision Transformers on current PyTorch and timm, measured for real.

A thin face, like timm's: importing it builds the method registry and nothing more. ``dyntok.show`` (matplotlib
and the data layer) and ``dyntok.convert`` (the official checkpoints' readers) are loaded on first use.
"""
from ._versions import __version__, warn_if_untested

warn_if_untested()

from .methods import (AdaptiveViT, LossOutput, Prediction, TrainingPhase, create_model,  # noqa: E402
                      create_model_from_config, list_methods, list_models, load_model, register_method, save_model)
from .adapt import adapt  # noqa: E402

__all__ = ["AdaptiveViT", "adapt", "convert", "LossOutput", "Prediction", "TrainingPhase", "create_model",
           "create_model_from_config", "list_methods", "list_models", "load_model", "register_method",
           "save_model", "show", "__version__"]


def __getattr__(name: str):
    if name == "show":
        from .report.gallery import show

        return show
    if name == "convert":
        from .convert import convert

        return convert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
