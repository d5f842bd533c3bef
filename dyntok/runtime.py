"""Run a dyntok export with onnxruntime: ``dyntok.runtime.load(DIR).predict(images)`` (see :mod:`dyntok.deploy`)."""
from .deploy.runtime import ExportedModel, load

__all__ = ["load", "ExportedModel"]
