"""AdaViT's released Ada-DeiT-S (Meng et al., CVPR 2022; github.com/MengLcool/AdaViT).

The official ``ada_step_deit_small_patch16_224`` is a DeiT-S whose attention keeps ``query``, ``key`` and
``value`` as three linear layers (concatenated here into timm's ``qkv``, in that order) and whose blocks
carry the decision heads: ``attn.token_select.mlp_head`` in every block (dyntok's patch policy, block 0's
being ``first_block_policy``), ``head_select.mlp_head`` and ``layer_select.mlp_head`` in blocks 1 and on
(``policies.{i-1}.head`` and ``.block``). A dropped head also gates its share of ``fc1``'s input
(``head_gates_mlp``). The official evaluation (``ada_main.py --eval_checkpoint``, ``ada_load_state_dict``)
loads ``state_dict_ema``, else ``state_dict``, else ``model``, and decides ``sigmoid(logit) > t`` with
t = 0.6 for patches and 0.5 for heads and blocks; dyntok decides ``sigmoid(logit / T) > t'`` (T = 5, the
training temperature), so the converted thresholds are ``t' = sigmoid(logit(t) / T)``: the same decisions.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..methods import AdaptiveViT
from ._official import backbone_official_name, read_checkpoint, timm_vit_backbone, write_converted

__all__ = ["convert", "dyntok_name", "joined_qkv", "official_name", "official_threshold", "separate_qkv",
           "threshold_for_official_code"]

SOURCE = "AdaViT"
#: The order ``ada_load_state_dict`` looks for the weights in: the EMA first.
WEIGHT_KEYS = ("state_dict_ema", "state_dict", "model")
#: The official inference thresholds on ``sigmoid(logit)`` (``SimpleTokenSelect``'s 0.6, the selects' 0.5).
OFFICIAL_THRESHOLDS = {"patch": 0.6, "head": 0.5, "block": 0.5}
#: dyntok's AdaViT temperature: the official training's tau, by which dyntok also divides at inference.
TEMPERATURE = 5.0

_DECISION = re.compile(r"blocks\.(\d+)\.(attn\.token_select|head_select|layer_select)\.mlp_head\.(weight|bias)")
_POLICY_OF = {"attn.token_select": "patch", "head_select": "head", "layer_select": "block"}
_SEPARATE_QKV = re.compile(r"(blocks\.\d+\.attn\.)(query|key|value)\.(weight|bias)")
_JOINED_QKV = re.compile(r"(blocks\.\d+\.attn\.)qkv\.(weight|bias)")
_DYNTOK_DECISION = re.compile(r"(first_block_policy|policies\.(\d+))\.(patch|head|block)\.(weight|bias)")
_MODULE_OF = {policy: module for module, policy in _POLICY_OF.items()}


def official_threshold(threshold: float, temperature: float = TEMPERATURE) -> float:
    """dyntok's threshold that takes the decisions ``sigmoid(logit) > threshold`` takes."""
    return 1.0 / (1.0 + math.exp(-math.log(threshold / (1.0 - threshold)) / temperature))


def threshold_for_official_code(threshold: float, temperature: float = TEMPERATURE) -> float:
    """The official code's threshold on ``sigmoid(logit)`` that takes the decisions dyntok takes at ``threshold``
    (on ``sigmoid(logit / temperature)``): the inverse of :func:`official_threshold`."""
    return 1.0 / (1.0 + math.exp(-temperature * math.log(threshold / (1.0 - threshold))))


def convert(path: str | Path, out: str | Path, num_heads: int | None = None) -> AdaptiveViT:
    """Write the official Ada-DeiT checkpoint ``path`` as a dyntok AdaViT at ``out``; returns the model."""
    official = read_checkpoint(path, WEIGHT_KEYS)
    official.weights = joined_qkv(official.weights)
    options = {"head_gates_mlp": True, "first_block_patch_policy": True, "temperature": TEMPERATURE}
    budget = {f"{name}_threshold": official_threshold(value) for name, value in OFFICIAL_THRESHOLDS.items()}
    return write_converted(official, out, "adavit", timm_vit_backbone(official, num_heads), options, budget,
                           dyntok_name, SOURCE)


def dyntok_name(key: str) -> str | None:
    """The dyntok weight an official key maps to (after ``query``/``key``/``value`` became ``qkv``)."""
    match = _DECISION.fullmatch(key)
    if match:
        block, module, kind = int(match[1]), match[2], match[3]
        policy = _POLICY_OF[module]
        owner = "first_block_policy" if block == 0 else f"policies.{block - 1}"
        return f"{owner}.{policy}.{kind}"
    if "_select" in key or _SEPARATE_QKV.fullmatch(key):
        return None
    return f"vit.{key}"


def official_name(key: str) -> str | None:
    """The official key of a dyntok weight (the inverse of :func:`dyntok_name`), ``attn.qkv`` still joined: the
    official layout splits it afterwards (:func:`separate_qkv`)."""
    match = _DYNTOK_DECISION.fullmatch(key)
    if match:
        owner, later_block, policy, kind = match.groups()
        block = 0 if owner == "first_block_policy" else int(later_block) + 1
        return f"blocks.{block}.{_MODULE_OF[policy]}.mlp_head.{kind}"
    return backbone_official_name(key)


def separate_qkv(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ``attn.qkv`` split into the official ``attn.query``, ``.key`` and ``.value`` (the inverse of
    :func:`joined_qkv`)."""
    separated = {}
    for key, value in weights.items():
        match = _JOINED_QKV.fullmatch(key)
        if match:
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                separated[f"{match[1]}{name}.{match[2]}"] = part
        else:
            separated[key] = value
    return separated


def joined_qkv(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attn.query/key/value`` concatenated into timm's ``attn.qkv`` where a block has all three."""
    joined = dict(weights)
    for key in weights:
        match = _SEPARATE_QKV.fullmatch(key)
        if match and match[2] == "query":
            parts = [f"{match[1]}{name}.{match[3]}" for name in ("query", "key", "value")]
            if all(part in weights for part in parts):
                joined[f"{match[1]}qkv.{match[3]}"] = torch.cat([joined.pop(part) for part in parts])
    return joined
