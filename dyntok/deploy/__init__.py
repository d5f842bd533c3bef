"""Deploying a dyntok model: export to ONNX (:mod:`.export`) and run the export with onnxruntime
(:mod:`.runtime`), with the same :class:`~dyntok.methods.Prediction` as the eager model (docs/deploy.md).

Kept free of imports: the methods import :mod:`.plan` while the package is being loaded.
"""
