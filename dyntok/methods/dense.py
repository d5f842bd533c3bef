"""The dense ViT: every image gets every token. The reference every method is measured against."""
from __future__ import annotations

import torch
from torch import Tensor

from ..measure.macs import vit_macs
from ..models.vit import BackboneSpec
from .base import Prediction, SingleViT
from .registry import register_method

__all__ = ["DenseViT"]


@register_method
class DenseViT(SingleViT):
    """A timm ViT wrapped in the method contract; its MACs are the same for every image."""

    method_name = "dense"

    def __init__(self, backbone: BackboneSpec) -> None:
        super().__init__(backbone)
        self.vit = backbone.build()
        self._macs = vit_macs(self.vit)

    def forward(self, x: Tensor) -> Tensor:
        self.check_images(x)
        return self.vit(x)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.check_images(x)
        logits = self.vit(x)
        return Prediction(logits, torch.full((x.shape[0],), self._macs, dtype=torch.float64))

    def dense_macs(self) -> float:
        return self._macs

    def init_from_dense(self, state_dict: dict[str, Tensor]) -> None:
        self.load_state_dict(state_dict)
