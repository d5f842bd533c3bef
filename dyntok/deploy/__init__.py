"""Deploying a dyntok model: export to ONNX (:mod:`.export`) and run the export with onnxruntime
(:mod:`.runtime`), with the same :class:`~dyntok.methods.Prediction` as the eager model (docs/deploy.md).
What a method hands over to be exported is part of the method contract (:mod:`dyntok.methods.export_plan`).
"""
