"""The officially released models, written out from their state dicts for checking the converters.

Each function follows the official repository's model definition and evaluation path, one image at a time,
on a state dict with the official key names; nothing here calls timm or dyntok. The state dicts are made with
the official structure (keys and shapes) and random values.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: DeiT's LayerNorm (``partial(nn.LayerNorm, eps=1e-6)``) and the predictors' plain ``nn.LayerNorm``.
DEIT_EPS, PREDICTOR_EPS = 1e-6, 1e-5


def random_deit(embed_dim: int = 32, depth: int = 12, num_classes: int = 5, img_size: int = 224,
                patch_size: int = 16, mlp_ratio: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """A DeiT state dict with the official (and timm's) key names, random values."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> Tensor:
        return scale * torch.randn(shape, generator=generator)

    dim, hidden, tokens = embed_dim, embed_dim * mlp_ratio, (img_size // patch_size) ** 2 + 1
    state = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, tokens, dim),
             "patch_embed.proj.weight": rand(dim, 3, patch_size, patch_size, scale=0.05),
             "patch_embed.proj.bias": rand(dim), "norm.weight": 1 + rand(dim), "norm.bias": rand(dim),
             "head.weight": rand(num_classes, dim), "head.bias": rand(num_classes)}
    for i in range(depth):
        prefix = f"blocks.{i}."
        state.update({prefix + "norm1.weight": 1 + rand(dim), prefix + "norm1.bias": rand(dim),
                      prefix + "attn.qkv.weight": rand(3 * dim, dim), prefix + "attn.qkv.bias": rand(3 * dim),
                      prefix + "attn.proj.weight": rand(dim, dim), prefix + "attn.proj.bias": rand(dim),
                      prefix + "norm2.weight": 1 + rand(dim), prefix + "norm2.bias": rand(dim),
                      prefix + "mlp.fc1.weight": rand(hidden, dim), prefix + "mlp.fc1.bias": rand(hidden),
                      prefix + "mlp.fc2.weight": rand(dim, hidden), prefix + "mlp.fc2.bias": rand(dim)})
    return state


def add_dynamicvit_predictors(state: dict[str, Tensor], stages: int = 3, seed: int = 1) -> dict[str, Tensor]:
    """DynamicViT's ``score_predictor.{s}`` (``PredictorLG``): in_conv LN, Linear; out_conv Linears 0, 2, 4."""
    generator = torch.Generator().manual_seed(seed)
    dim = state["cls_token"].shape[-1]
    shapes = {"in_conv.0.weight": (dim,), "in_conv.0.bias": (dim,), "in_conv.1.weight": (dim, dim),
              "in_conv.1.bias": (dim,), "out_conv.0.weight": (dim // 2, dim), "out_conv.0.bias": (dim // 2,),
              "out_conv.2.weight": (dim // 4, dim // 2), "out_conv.2.bias": (dim // 4,),
              "out_conv.4.weight": (2, dim // 4), "out_conv.4.bias": (2,)}
    for stage in range(stages):
        for name, shape in shapes.items():
            value = 0.3 * torch.randn(shape, generator=generator)
            state[f"score_predictor.{stage}.{name}"] = 1 + value if name == "in_conv.0.weight" else value
    return state


# --------------------------------------------------------------------------------------------- DeiT pieces
def embed(state: dict[str, Tensor], image: Tensor) -> Tensor:
    """(3, H, W) -> (1 + N, C): class token, then the patches row by row, plus position embeddings."""
    weight = state["patch_embed.proj.weight"]
    patches = F.conv2d(image[None], weight, state["patch_embed.proj.bias"], stride=weight.shape[-1])
    patches = patches.flatten(2)[0].T
    return torch.cat([state["cls_token"][0], patches]) + state["pos_embed"][0]


def attention(state: dict[str, Tensor], index: int, x: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Block ``index``'s attention branch on (N, C) and its attention map (heads, N, N)."""
    prefix, (tokens, dim) = f"blocks.{index}.", x.shape
    h = F.layer_norm(x, (dim,), state[prefix + "norm1.weight"], state[prefix + "norm1.bias"], DEIT_EPS)
    qkv = F.linear(h, state[prefix + "attn.qkv.weight"], state[prefix + "attn.qkv.bias"])
    q, k, v = qkv.view(tokens, 3, heads, dim // heads).permute(1, 2, 0, 3)
    weights = ((q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5).softmax(dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(tokens, dim)
    return F.linear(out, state[prefix + "attn.proj.weight"], state[prefix + "attn.proj.bias"]), weights


def mlp(state: dict[str, Tensor], index: int, x: Tensor) -> Tensor:
    prefix, dim = f"blocks.{index}.", x.shape[-1]
    h = F.layer_norm(x, (dim,), state[prefix + "norm2.weight"], state[prefix + "norm2.bias"], DEIT_EPS)
    h = F.gelu(F.linear(h, state[prefix + "mlp.fc1.weight"], state[prefix + "mlp.fc1.bias"]))
    return F.linear(h, state[prefix + "mlp.fc2.weight"], state[prefix + "mlp.fc2.bias"])


def head(state: dict[str, Tensor], x: Tensor) -> Tensor:
    dim = x.shape[-1]
    cls = F.layer_norm(x[0], (dim,), state["norm.weight"], state["norm.bias"], DEIT_EPS)
    return F.linear(cls, state["head.weight"], state["head.bias"])


def depth_of(state: dict[str, Tensor]) -> int:
    return 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))


# --------------------------------------------------------------------------------------------- DynamicViT
def dynamicvit_logits(state: dict[str, Tensor], images: Tensor, keep_ratio: float, heads: int,
                      locations=(3, 6, 9)) -> Tensor:
    """``VisionTransformerDiffPruning.forward`` in eval mode (raoyongming/DynamicViT), image by image."""
    return torch.stack([_dynamicvit_one(state, image, keep_ratio, heads, locations) for image in images])


def _dynamicvit_one(state, image, keep_ratio, heads, locations) -> Tensor:
    x = embed(state, image)
    initial = len(x) - 1
    ratios = [keep_ratio, keep_ratio ** 2, keep_ratio ** 3]
    for index in range(depth_of(state)):
        if index in locations:
            stage = locations.index(index)
            scores = _predictor(state, stage, x[1:])[:, 0]
            keep = int(initial * ratios[stage])
            order = torch.argsort(scores, descending=True)[:keep]
            x = torch.cat([x[:1], x[1:][order]])
        x = x + attention(state, index, x, heads)[0]
        x = x + mlp(state, index, x)
    return head(state, x)


def _predictor(state: dict[str, Tensor], stage: int, patches: Tensor) -> Tensor:
    """``PredictorLG`` with every token still present kept (its policy is all ones in eval)."""
    prefix, dim = f"score_predictor.{stage}.", patches.shape[-1]
    x = F.layer_norm(patches, (dim,), state[prefix + "in_conv.0.weight"], state[prefix + "in_conv.0.bias"],
                     PREDICTOR_EPS)
    x = F.gelu(F.linear(x, state[prefix + "in_conv.1.weight"], state[prefix + "in_conv.1.bias"]))
    local, pooled = x[:, :dim // 2], x[:, dim // 2:].mean(dim=0, keepdim=True)
    x = torch.cat([local, pooled.expand(len(x), -1)], dim=-1)
    for layer in (0, 2, 4):
        x = F.linear(x, state[f"{prefix}out_conv.{layer}.weight"], state[f"{prefix}out_conv.{layer}.bias"])
        x = F.gelu(x) if layer < 4 else x
    return x.log_softmax(dim=-1)


# --------------------------------------------------------------------------------------------- EViT
def evit_logits(state: dict[str, Tensor], images: Tensor, keep_rate: float, fuse: bool, heads: int,
                locations=(3, 6, 9)) -> Tensor:
    """``EViT.forward`` at inference (youweiliang/evit ``evit.py``), image by image."""
    return torch.stack([_evit_one(state, image, keep_rate, fuse, heads, locations) for image in images])


def _evit_one(state, image, keep_rate, fuse, heads, locations) -> Tensor:
    x = embed(state, image)
    for index in range(depth_of(state)):
        branch, weights = attention(state, index, x, heads)
        x = x + branch
        patches = len(x) - 1
        left = math.ceil(keep_rate * patches)
        if index in locations and keep_rate < 1 and left < patches:
            cls_attention = weights[:, 0, 1:].mean(dim=0)
            top = torch.topk(cls_attention, left, largest=True, sorted=True).indices
            rest = torch.ones(patches, dtype=torch.bool)
            rest[top] = False
            kept = [x[:1], x[1:][top]]
            if fuse:
                kept.append((x[1:][rest] * cls_attention[rest, None]).sum(dim=0, keepdim=True))
            x = torch.cat(kept)
        x = x + mlp(state, index, x)
    return head(state, x)


# --------------------------------------------------------------------------------------------- DVT
#: ``DVT_Deit_small``'s stages, coarse to fine, and their patch kernels (the middle one with padding 3).
DVT_STAGES = (("less_less_token", 32), ("less_token", 23), ("normal_token", 16))


def random_dvt(embed_dim: int = 32, depth: int = 3, heads: int = 2, num_classes: int = 5, reuse_hidden: int = 128,
               reuse_dim: int = 48, seed: int = 0) -> dict[str, Tensor]:
    """A ``DVT_Deit_small`` state dict (official key names, 224px geometry), random values."""
    generator = torch.Generator().manual_seed(seed + 100)
    state = {}
    for index, (stage, kernel) in enumerate(DVT_STAGES):
        deit = random_deit(embed_dim, depth, num_classes, img_size=224, patch_size=16, seed=seed + index)
        grid = 10 if kernel == 23 else 224 // kernel
        deit["patch_embed.proj.weight"] = 0.05 * torch.randn(embed_dim, 3, kernel, kernel, generator=generator)
        deit["pos_embed"] = 0.2 * torch.randn(1, grid * grid + 1, embed_dim, generator=generator)
        if index > 0:
            _add_dvt_reuse(deit, embed_dim, depth, heads, reuse_hidden, reuse_dim, generator)
        state.update({f"{stage}.{key}": value for key, value in deit.items()})
    return state


def _add_dvt_reuse(deit, dim, depth, heads, hidden, out, generator) -> None:
    def rand(*shape):
        return 0.2 * torch.randn(shape, generator=generator)

    for i in range(depth):
        prefix = f"blocks.{i}."
        deit[prefix + "norm2.weight"], deit[prefix + "norm2.bias"] = 1 + rand(dim + out), rand(dim + out)
        deit[prefix + "mlp.fc1.weight"] = rand(dim * 4, dim + out)
        deit.update({prefix + "feature_resuse_mlp.0.weight": 1 + rand(dim),
                     prefix + "feature_resuse_mlp.0.bias": rand(dim),
                     prefix + "feature_resuse_mlp.1.fc1.weight": rand(hidden, dim),
                     prefix + "feature_resuse_mlp.1.fc1.bias": rand(hidden),
                     prefix + "feature_resuse_mlp.1.fc2.weight": rand(out, hidden),
                     prefix + "feature_resuse_mlp.1.fc2.bias": rand(out)})
    maps = heads * depth
    deit.update({"relation_reuse_conv.0.weight": rand(3 * maps, maps, 1, 1),
                 "relation_reuse_conv.0.bias": rand(3 * maps),
                 "relation_reuse_conv.2.weight": rand(maps, 3 * maps, 1, 1), "relation_reuse_conv.2.bias": rand(maps)})


def dvt_logits(state: dict[str, Tensor], images: Tensor, heads: int) -> list[Tensor]:
    """``DVT_Deit_small_model.forward`` (every stage, every image) from the official ``vision_transformer.py``."""
    exits, features, relations = [], None, None
    for stage, _ in DVT_STAGES:
        weights = {key[len(stage) + 1:]: value for key, value in state.items() if key.startswith(stage + ".")}
        logits, features, relations = _dvt_stage(weights, images, heads, features, relations)
        exits.append(logits)
    return exits


def _dvt_resample(maps: Tensor, grid: int) -> Tensor:
    """The official upsampling: nearest to 14 x 14 (for the 10 x 10 stage) or 20 x 20, then average pooling."""
    upsampled = F.interpolate(maps, size=(14, 14) if grid == 10 else (20, 20), mode="nearest")
    return F.adaptive_avg_pool2d(upsampled, (grid, grid))


def _dvt_stage(w, images, heads, features, relations):
    kernel = w["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(images, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=kernel,
                 padding=3 if kernel == 23 else 0).flatten(2).transpose(1, 2)
    batch, dim = len(images), x.shape[-1]
    x = torch.cat([w["cls_token"].expand(batch, -1, -1), x], dim=1) + w["pos_embed"]
    depth, new_hw = depth_of(w), x.shape[1] - 1
    grid = math.isqrt(new_hw)
    biases = [None] * depth
    if relations is not None:
        biases = _dvt_relation_biases(w, torch.cat(relations, 1), batch, new_hw, grid).chunk(depth, 1)
    exported = []
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), w[p + "norm1.weight"], w[p + "norm1.bias"], DEIT_EPS)
        q, k, v = F.linear(h, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"]).reshape(
            batch, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5
        if biases[i] is not None:
            attn = attn + biases[i]
        exported.append(attn)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, -1, dim)
        x = x + F.linear(out, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        mlp_in = x
        if features is not None:
            f = F.layer_norm(features, (dim,), w[p + "feature_resuse_mlp.0.weight"], w[p + "feature_resuse_mlp.0.bias"],
                             DEIT_EPS)
            f = F.gelu(F.linear(f, w[p + "feature_resuse_mlp.1.fc1.weight"], w[p + "feature_resuse_mlp.1.fc1.bias"]))
            f = F.linear(f, w[p + "feature_resuse_mlp.1.fc2.weight"], w[p + "feature_resuse_mlp.1.fc2.bias"])[:, 1:]
            channels, side = f.shape[-1], math.isqrt(f.shape[1])
            f = _dvt_resample(f.transpose(1, 2).reshape(batch, channels, side, side), grid)
            f = f.view(batch, channels, new_hw).transpose(1, 2)
            mlp_in = torch.cat([x, torch.cat([torch.zeros(batch, 1, channels), f], dim=1)], dim=2)
        width = mlp_in.shape[-1]
        h = F.layer_norm(mlp_in, (width,), w[p + "norm2.weight"], w[p + "norm2.bias"], DEIT_EPS)
        h = F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    cls = F.layer_norm(x[:, 0], (dim,), w["norm.weight"], w["norm.bias"], DEIT_EPS)
    return F.linear(cls, w["head.weight"], w["head.bias"]), x, exported


def _dvt_relation_biases(w, relations, batch, new_hw, grid):
    """The official ``forward_features`` prologue: the relation MLP, then keys, then queries resampled."""
    hidden = F.gelu(F.conv2d(relations, w["relation_reuse_conv.0.weight"], w["relation_reuse_conv.0.bias"]))
    relations = F.conv2d(hidden, w["relation_reuse_conv.2.weight"], w["relation_reuse_conv.2.bias"])
    patch_keys = relations[:, :, :, 1:]
    _, _, n, hw = patch_keys.shape
    side = math.isqrt(hw)
    resampled = _dvt_resample(patch_keys.reshape(-1, n, side, side), grid).reshape(-1, n, new_hw)
    rows = torch.cat([relations[:, :, :, 0].reshape(-1, n, 1), resampled], dim=2).transpose(1, 2)
    cls_column, patch_queries = rows[:, :, 0:1], rows[:, :, 1:].reshape(-1, new_hw + 1, side, side)
    resampled = _dvt_resample(patch_queries, grid).reshape(-1, new_hw + 1, new_hw)
    return torch.cat([cls_column, resampled], dim=2).transpose(1, 2).reshape(batch, -1, new_hw + 1, new_hw + 1)


# --------------------------------------------------------------------------------------------- AdaViT
def random_adavit(embed_dim: int = 32, depth: int = 3, heads: int = 2, num_classes: int = 5, seed: int = 0,
                  ema: bool = True) -> dict[str, Tensor]:
    """An ``ada_step_deit_*`` state dict: DeiT with ``attn.query/key/value`` and the decision heads."""
    generator = torch.Generator().manual_seed(seed + 200)
    state = {}
    for key, value in random_deit(embed_dim, depth, num_classes, seed=seed).items():
        if ".attn.qkv." in key:
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                state[key.replace("qkv", name)] = part
        else:
            state[key] = value
    for i in range(depth):
        selects = {"attn.token_select": 1} if i == 0 else {"attn.token_select": 1, "head_select": heads,
                                                            "layer_select": 2}
        for module, outputs in selects.items():
            state[f"blocks.{i}.{module}.mlp_head.weight"] = torch.randn(outputs, embed_dim, generator=generator)
            state[f"blocks.{i}.{module}.mlp_head.bias"] = 0.5 * torch.randn(outputs, generator=generator)
    return state


def adavit_logits(state: dict[str, Tensor], images: Tensor, heads: int) -> Tensor:
    """``AdaStepT2T_ViT.forward`` of the released Ada-DeiT (``StepAdaBlock``s with a token select in every
    block, head and layer selects from block 1, heads gating q, k, v, proj and fc1's input, tokens gating
    attention and MLP), in eval mode: decisions ``sigmoid(logit) > 0.6`` for tokens, ``> 0.5`` otherwise."""
    batch = len(images)
    weight = state["patch_embed.proj.weight"]
    x = F.conv2d(images, weight, state["patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1) + state["pos_embed"]
    for i in range(depth_of(state)):
        x = _adavit_block(state, f"blocks.{i}.", x, heads)
    dim = x.shape[-1]
    return F.linear(F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], DEIT_EPS)[:, 0],
                    state["head.weight"], state["head.bias"])


def _select(state, prefix, inputs, threshold):
    weight = state.get(prefix + "mlp_head.weight")
    if weight is None:
        return None
    return (F.linear(inputs, weight, state[prefix + "mlp_head.bias"]).sigmoid() > threshold).float()


def _adavit_block(w, p, x, heads):
    batch, length, dim = x.shape
    head_dim = dim // heads
    head_select = _select(w, p + "head_select.", x[:, 0], 0.5)
    layer_select = _select(w, p + "layer_select.", x[:, 0], 0.5)
    width = x.new_ones(batch, dim) if head_select is None else head_select.repeat_interleave(head_dim, dim=1)
    h = F.layer_norm(x, (dim,), w[p + "norm1.weight"], w[p + "norm1.bias"], DEIT_EPS)
    q, k, v = ((F.linear(h, w[f"{p}attn.{name}.weight"], w[f"{p}attn.{name}.bias"]) * width[:, None])
               .reshape(batch, length, heads, head_dim).transpose(1, 2) for name in ("query", "key", "value"))
    logits = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
    tokens = _select(w, p + "attn.token_select.", h[:, 1:], 0.6)
    token_select = torch.cat([tokens.new_ones(batch, 1, 1), tokens], dim=1)[..., 0]
    pairs = (token_select[:, :, None] * token_select[:, None, :])[:, None]
    fill = torch.zeros_like(logits).masked_fill((1 - pairs - torch.eye(length)) > 0, float("-inf"))
    out = ((logits * pairs + fill).softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    out = F.linear(out * width[:, None], w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]) * token_select[..., None]
    x = x + (out if layer_select is None else layer_select[:, :1, None] * out)
    h = F.layer_norm(x, (dim,), w[p + "norm2.weight"], w[p + "norm2.bias"], DEIT_EPS) * width[:, None]
    out = F.linear(F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])), w[p + "mlp.fc2.weight"],
                   w[p + "mlp.fc2.bias"]) * token_select[..., None]
    return x + (out if layer_select is None else layer_select[:, 1:, None] * out)
