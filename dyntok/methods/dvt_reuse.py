"""What DVT adds to timm's ViT blocks: reuse of the previous, coarser stage's features and attention.

* :func:`block_forward` is timm's ``Block.forward`` with the two seams DVT needs: an additive bias on the
  attention logits (timm's own ``attn_mask`` argument) and extra features concatenated to the MLP input. When
  the next stage reuses relations it also returns the pre-softmax logits, which timm's fused attention never
  materialises, so :func:`attention_with_logits` writes that one path out with timm's sub-modules.
* :class:`FeatureReuse` and :class:`RelationReuse` turn what the previous stage computed on its grid into
  inputs for the current stage's grid.

``tests/test_dvt.py`` holds the rewritten forwards to timm's own output, so a timm upgrade that changes
``Block`` or ``Attention`` fails loudly instead of silently computing something else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from ..measure.macs import linear_macs

__all__ = ["attention_with_logits", "block_forward", "widen_mlp_input", "resample_token_axis",
           "resample_both_token_axes", "resampling_matrix", "token_resampling_matrix", "resampling_macs",
           "RESAMPLING_MODES", "check_block_supported", "FeatureReuse", "RelationReuse"]


def check_block_supported(block: nn.Module) -> None:
    """Raise ``ValueError`` unless ``block`` is the plain timm pre-norm block these forwards rewrite."""
    attn = getattr(block, "attn", None)
    supported = (isinstance(block, Block) and isinstance(attn, Attention) and getattr(attn, "gate", None) is None
                 and isinstance(block.norm2, nn.LayerNorm) and isinstance(getattr(block.mlp, "fc1", None), nn.Linear))
    if not supported:
        raise ValueError(f"DVT needs timm's plain Block (Attention without gate, LayerNorm, Mlp with fc1); got "
                         f"{type(block).__name__} with {type(attn).__name__} attention")


def attention_with_logits(attn: Attention, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """timm ``Attention.forward(x, attn_mask=bias)`` that also returns the pre-softmax logits (B, H, N, N).

    The logits include ``bias``: they are what the softmax saw, which is what the published code hands on.
    """
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    weights = attn.attn_drop(logits.softmax(dim=-1))
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    return attn.proj_drop(attn.proj(attn.norm(out))), logits


def block_forward(block: Block, x: Tensor, relation_bias: Tensor | None = None, reused: Tensor | None = None,
                  return_logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """timm ``Block.forward`` plus DVT's reuse; returns the tokens and (if asked) the attention logits.

    ``relation_bias`` (B, H, N, N) is added to the attention logits before the softmax; ``reused`` (B, N, r)
    is concatenated to the MLP input, whose ``norm2`` and ``fc1`` must have been widened by
    :func:`widen_mlp_input`. With neither, this is exactly ``block(x)``.
    """
    normed = block.norm1(x)
    if return_logits:
        attended, logits = attention_with_logits(block.attn, normed, relation_bias)
    else:  # timm's own (fused) attention; the bias goes through its additive-mask seam
        attended, logits = block.attn(normed, attn_mask=relation_bias), None
    x = x + block.drop_path1(block.ls1(attended))
    mlp_input = x if reused is None else torch.cat([x, reused], dim=-1)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(mlp_input))))
    return x, logits


def widen_mlp_input(block: Block, extra: int) -> None:
    """Give ``block.norm2`` and ``block.mlp.fc1`` ``extra`` more input features, as published DVT does.

    The block's current weights fill the leading slots (so a pretrained block keeps what it learnt); the new
    norm entries start at the identity and the new ``fc1`` columns get timm's ViT init (truncated normal,
    std 0.02) rather than zeros, so gradients reach the reuse modules from the first step.
    """
    norm, fc1 = block.norm2, block.mlp.fc1
    dim = fc1.in_features
    wide_norm = nn.LayerNorm(dim + extra, eps=norm.eps)
    wide_fc1 = nn.Linear(dim + extra, fc1.out_features, bias=fc1.bias is not None)
    with torch.no_grad():
        wide_norm.weight[:dim] = norm.weight
        wide_norm.bias[:dim] = norm.bias
        trunc_normal_(wide_fc1.weight, std=0.02)
        wide_fc1.weight[:, :dim] = fc1.weight
        if fc1.bias is not None:
            wide_fc1.bias.copy_(fc1.bias)
    block.norm2, block.mlp.fc1 = wide_norm, wide_fc1


#: How reused features and relations are brought to a finer grid: dyntok's bilinear interpolation, or the
#: published DeiT code's nearest-neighbour upsampling to twice the grid followed by adaptive average pooling.
RESAMPLING_MODES = ("bilinear", "nearest-avgpool")


def resampling_matrix(old_grid: int, new_grid: int, mode: str = "bilinear") -> Tensor:
    """(new_grid, old_grid) float32 weights of one axis of the 2-d resampling ``mode`` names.

    They are read off the 2-d operator itself, so they are PyTorch's exactly (its antialiasing filter
    included): image ``r`` is ones on row ``r`` and zeros elsewhere, so each of its output columns is the
    weights given to row ``r`` (every mode's weights sum to one along the other axis).
    """
    rows = torch.eye(old_grid)[:, None, :, None].expand(old_grid, 1, old_grid, old_grid).contiguous()
    if mode == "nearest-avgpool":
        out = F.adaptive_avg_pool2d(F.interpolate(rows, size=(2 * old_grid,) * 2, mode="nearest"), new_grid)
    else:
        out = F.interpolate(rows, size=(new_grid, new_grid), mode="bilinear", align_corners=False,
                            antialias=new_grid < old_grid)
    return out[:, 0, :, 0].t().contiguous()


def token_resampling_matrix(old_grid: int, new_grid: int, num_prefix: int, mode: str = "bilinear") -> Tensor:
    """(prefix + new_grid², prefix + old_grid²) float32 matrix that resamples a token axis laid out as timm
    orders it (prefix tokens, then the patch grid row by row): the prefix tokens are kept, the patch grid is
    resampled in 2-d, bilinearly (antialiased when shrinking) or with ``mode="nearest-avgpool"`` as the
    published DeiT model does (nearest to ``2 * old_grid``, then adaptive average pooling to ``new_grid``).

    Both modes are separable, so the grid part is the Kronecker product of one axis' weights
    (:func:`resampling_matrix`) with itself. One matrix product per axis costs more MACs than resampling rows
    and columns in turn, but it is one large product with no reshaping copies, and that is what is fast: on
    DVT's attention logits at DeiT-S shape (CPU) it took less than half the time of the two-pass form, and it
    keeps clear of CUDA's ``upsample_bilinear2d``, which at DeiT-S, batch 256, took 236 ms for one call on an
    H200 (the whole dense model: 23 ms).
    """
    if mode not in RESAMPLING_MODES:
        raise ValueError(f"resampling must be one of {RESAMPLING_MODES}, got {mode!r}")
    axis = resampling_matrix(old_grid, new_grid, mode) if old_grid != new_grid else torch.eye(old_grid)
    return torch.block_diag(torch.eye(num_prefix), torch.kron(axis, axis))


def resample_token_axis(values: Tensor, matrix: Tensor) -> Tensor:
    """``values`` (..., tokens, C) with its token axis (-2) resampled by ``matrix`` (new tokens, tokens), a
    :func:`token_resampling_matrix` (the reuse modules keep theirs as a buffer, made once)."""
    return torch.matmul(matrix.to(values.dtype), values)


def resample_both_token_axes(maps: Tensor, matrix: Tensor) -> Tensor:
    """``matrix @ maps @ matrix.T`` for maps (..., tokens, tokens): the query and the key axis of attention
    logits resampled alike. The key axis goes first, as one matrix product over every row of every map."""
    matrix = matrix.to(maps.dtype)
    *leading, tokens, _ = maps.shape
    keys_done = torch.matmul(maps.reshape(-1, tokens), matrix.t()).reshape(*leading, tokens, -1)
    return torch.matmul(matrix, keys_done)


def _patch_resampling(old_grid: int, new_grid: int, num_prefix: int, mode: str) -> Tensor | None:
    """The reuse modules' resampling matrix; ``None`` when the grids are equal (nothing to resample)."""
    return None if old_grid == new_grid else token_resampling_matrix(old_grid, new_grid, num_prefix, mode)


def resampling_macs(old_tokens: int, new_tokens: int, channels: int) -> int:
    """MACs of :func:`resample_token_axis` for one item of ``channels`` channels: one matrix product."""
    return new_tokens * old_tokens * channels


class FeatureReuse(nn.Module):
    """Feature reuse for one block: previous stage's final patch tokens -> LayerNorm + MLP -> current grid.

    The output (B, prefix + grid², out_dim) is concatenated to that block's MLP input. The previous stage's
    class token is not reused; the prefix (class) positions get the mean of the reused patch features. The
    published DeiT code gives them zeros instead (``class_fill="zeros"``), which leaves the last block of the
    last stage with a reuse MLP that cannot change the prediction (its patch tokens feed nothing once the class
    token is pooled). ``resampling`` is a :data:`RESAMPLING_MODES` entry.
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, previous_grid: int, grid: int, num_prefix: int,
                 eps: float = 1e-6, resampling: str = "bilinear", class_fill: str = "mean") -> None:
        super().__init__()
        self.previous_grid, self.grid, self.num_prefix = previous_grid, grid, num_prefix
        self.class_fill = class_fill
        self.register_buffer("resampling_weights", _patch_resampling(previous_grid, grid, 0, resampling),
                             persistent=False)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_dim, out_dim)

    def forward(self, previous_tokens: Tensor) -> Tensor:
        return self.to_grid(self.coarse(previous_tokens))

    def coarse(self, previous_tokens: Tensor) -> Tensor:
        """The MLP on the previous (coarser) grid, before upsampling: fewer tokens, same result shape."""
        return self.mlp(self.norm(previous_tokens[:, self.num_prefix:]))

    def to_grid(self, features: Tensor) -> Tensor:
        """(B, previous_grid², C) -> (B, prefix + grid², C), channel by channel: the outputs of several
        modules concatenated on C go through at once (:meth:`DVTStage` does so for all its blocks)."""
        if self.resampling_weights is not None:
            features = resample_token_axis(features, self.resampling_weights)
        if self.class_fill == "zeros":
            prefix = torch.zeros_like(features[:, :1])
        else:
            prefix = features.mean(dim=1, keepdim=True)
        prefix = prefix.expand(-1, self.num_prefix, -1)
        return torch.cat([prefix, features], dim=1)

    def macs(self) -> float:
        """MACs per image: the two MLP layers over the previous stage's patch tokens, and their resampling."""
        tokens = self.previous_grid ** 2
        resampling = (resampling_macs(tokens, self.grid ** 2, self.mlp.fc2.out_features)
                      if self.resampling_weights is not None else 0)
        return linear_macs(self.mlp.fc1, tokens) + linear_macs(self.mlp.fc2, tokens) + resampling


class RelationReuse(nn.Module):
    """Relationship reuse: previous stage's attention logits of all layers -> additive biases for this one.

    The logits (B, L*H, N', N') go through a 1x1-convolution MLP over the L*H channels (L*H -> 3*L*H -> L*H,
    GELU), then both token axes are resampled to this stage's grid with :func:`resample_both_token_axes`:
    the patch-patch block is resampled grid-to-grid (4-d), the class row and column as 2-d maps, and the
    class-class entry is kept.
    ``resampling`` is a :data:`RESAMPLING_MODES` entry.
    """

    def __init__(self, channels: int, previous_grid: int, grid: int, num_prefix: int, expansion: int = 3,
                 resampling: str = "bilinear") -> None:
        super().__init__()
        self.previous_grid, self.grid, self.num_prefix = previous_grid, grid, num_prefix
        self.register_buffer("resampling_weights", _patch_resampling(previous_grid, grid, num_prefix, resampling),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels * expansion, kernel_size=1), nn.GELU(),
                                 nn.Conv2d(channels * expansion, channels, kernel_size=1))

    def forward(self, previous_logits: Tensor) -> Tensor:
        bias = self._channel_mlp(previous_logits)
        if self.resampling_weights is None:
            return bias
        return resample_both_token_axes(bias, self.resampling_weights)

    def _channel_mlp(self, logits: Tensor) -> Tensor:
        """``self.mlp`` (1x1 convolutions, GELU) as two matmuls over the channel axis: the same result without
        the convolution machinery, which is slow for a 1x1 kernel at small batches on CPU. A replaced ``mlp``
        (anything but the built convolution pair) is called as it is."""
        if not (isinstance(self.mlp, nn.Sequential) and len(self.mlp) == 3):
            return self.mlp(logits)
        first, gelu, second = self.mlp
        batch, channels, height, width = logits.shape
        # baddbmm, like the convolution, runs in the autocast dtype, bias included (bf16 stays bf16 on GPU).
        hidden = gelu(torch.baddbmm(first.bias[:, None], first.weight.flatten(1).expand(batch, -1, -1),
                                    logits.reshape(batch, channels, -1)))
        out = torch.baddbmm(second.bias[:, None], second.weight.flatten(1).expand(batch, -1, -1), hidden)
        return out.reshape(batch, -1, height, width)

    def macs(self) -> float:
        """MACs per image: the two 1x1 convolutions at every (query, key) position of the previous stage, then
        the resampling of the query axis (one item per map and key) and of the key axis (per map and query)."""
        old_tokens, new_tokens = self.num_prefix + self.previous_grid ** 2, self.num_prefix + self.grid ** 2
        convs = [conv for conv in self.mlp if isinstance(conv, nn.Conv2d)]
        maps = convs[-1].out_channels if convs else 0
        macs = sum(old_tokens ** 2 * conv.in_channels * conv.out_channels for conv in convs)
        if self.resampling_weights is not None:  # the key axis of every old query, then the query axis
            macs += maps * (resampling_macs(old_tokens, new_tokens, old_tokens)
                            + resampling_macs(old_tokens, new_tokens, new_tokens))
        return float(macs)
