"""A small Vision Transformer (ViT-Tiny) with timm's initialization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from lottery.models.layers import torch_default_bias, torch_default_kernel, zeros


# timm's trunc_normal_(std=.02) truncates at +-2 (absolute), i.e. at 100 std: a plain normal.
vit_normal = nn.initializers.normal(0.02)
VIT_POOLS = ("cls", "mean")


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)) (GELU, exact)."""

    dim: int
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.dim, out_features=self.dim,
            kernel_init=vit_normal, bias_init=zeros, name="attn")(y, y)
        x = x + y
        y = nn.LayerNorm(epsilon=1e-6, name="ln2")(x)
        y = nn.Dense(self.mlp_dim, kernel_init=vit_normal, bias_init=zeros, name="fc1")(y)
        y = nn.gelu(y, approximate=False)
        y = nn.Dense(self.dim, kernel_init=vit_normal, bias_init=zeros, name="fc2")(y)
        return x + y


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021) in timm's layout, pre-norm blocks.

    `patch_embed`: a `patch` x `patch` stride-`patch` conv to `dim` features (H and W must be
    multiples of `patch`); with `pool='cls'` (the default, as ViT, DeiT and timm) a learned class
    token `cls` is prepended and read out after the final LayerNorm `norm`; with `pool='mean'` the
    tokens are averaged instead. A learned position embedding `pos_embedding` (1, tokens, dim) is
    added; its length is fixed by the input shape at init. `depth` blocks `block{i}` of
    multi-head self-attention (`heads` heads of dim / heads) and an MLP of `mlp_ratio` * dim
    (GELU), LayerNorm eps 1e-6, no dropout; Dense `out`. `vit_tiny_patch16` is timm's
    `vit_tiny_patch16_224` (dim 192, depth 12, heads 3): 5,717,416 parameters for 224x224 input
    and 1000 classes; `vit_tiny_patch4` is the same network with 4x4 patches for 32x32 input.
    """

    num_classes: int = 1000
    patch: int = 16
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: int = 4
    pool: str = "cls"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no batch statistics
        if self.pool not in VIT_POOLS:
            raise ValueError(f"pool={self.pool!r}: must be one of {list(VIT_POOLS)}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not a multiple of heads={self.heads}")
        if x.ndim != 4 or x.shape[1] % self.patch or x.shape[2] % self.patch:
            raise ValueError(f"ViT input {tuple(x.shape)}: expected (N, H, W, C) with H and W "
                             f"multiples of patch={self.patch}")
        fan_in = self.patch * self.patch * x.shape[-1]
        x = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch),
                    padding="VALID", kernel_init=torch_default_kernel,
                    bias_init=torch_default_bias(fan_in), name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.normal(1e-6), (1, 1, self.dim))
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        x = x + self.param("pos_embedding", vit_normal, (1, x.shape[1], self.dim))
        for i in range(self.depth):
            x = ViTBlock(self.dim, self.heads, self.mlp_ratio * self.dim, name=f"block{i}")(x)
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        return nn.Dense(self.num_classes, kernel_init=vit_normal, bias_init=zeros, name="out")(x)

