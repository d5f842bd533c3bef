"""dyntok: input-adaptive Vision Transformers on current PyTorch and timm, measured for real.

A thin face, like timm's: importing it builds the method registry and its two doors for outside models
(``adapt``, ``convert``), and nothing more. ``dyntok.show`` (matplotlib and the data layer), ``dyntok.export``
and ``dyntok.runtime`` (ONNX) are loaded on first use.
"""
from ._versions import __version__, warn_if_untested

warn_if_untested()

from .methods import (AdaptiveViT, LossOutput, Prediction, TrainingPhase, create_model,  # noqa: E402
                      create_model_from_config, list_methods, list_models, load_model, register_method, save_model)
from .adapt import adapt  # noqa: E402
from .convert import convert  # noqa: E402  (the function; the package stays importable as dyntok.convert.*)

__all__ = ["AdaptiveViT", "adapt", "convert", "LossOutput", "Prediction", "TrainingPhase", "create_model",
           "create_model_from_config", "export", "list_methods", "list_models", "load_model", "register_method",
           "runtime",
           "save_model", "show", "__version__"]


def __getattr__(name: str):
    if name == "show":
        from .report.gallery import show

        return show
    if name == "export":  # ONNX export (dyntok.deploy), loaded on first use like show
        from .deploy.export import export

        return export
    if name == "runtime":  # a submodule: importing it by name (a `from . import` here would recurse)
        import importlib

        return importlib.import_module(".runtime", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
