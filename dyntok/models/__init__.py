"""Backbones: timm plain ViTs by name, plus CIFAR-sized presets."""
from .vit import BACKBONE_OVERRIDES, PRESETS, BackboneSpec, create_backbone, list_backbones

__all__ = ["BACKBONE_OVERRIDES", "PRESETS", "BackboneSpec", "create_backbone", "list_backbones"]
