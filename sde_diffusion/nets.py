"""Score networks (flax NNX) with the call convention ``net(x, c_noise, label=None) -> y``.

``x`` is a batch ``(B, *event_shape)``, ``c_noise`` the batch ``(B,)`` of time inputs of order one
(``sd.noise_level``), ``label`` ``None`` or integer classes ``(B,)``; ``y`` has the shape and dtype
of ``x``. Wrap a network with ``sd.Network(net, sde)`` and a prediction type, e.g.
``sd.Noise(sd.Network(sd.nets.UNet(rngs=nnx.Rngs(0)), sd.VP()))``.

Time enters through an embedding ``e(c)`` (sinusoidal or random Fourier features) and a learned
map ``cond = SiLU(W e(c) + b + E[label])``; class ``num_classes`` of ``E`` is the null label
(unconditional), used when ``label is None`` and by classifier-free guidance.

Mixed precision: ``dtype`` is the compute dtype, ``param_dtype`` that of the stored weights.
GroupNorm statistics and attention softmax are computed in at least float32; the output is
cast back to ``x.dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, DTypeLike

from ._checks import require


class FrozenFrequencies(nnx.Variable):
    """Fixed random frequencies: model state, not an ``nnx.Param``, so optimisers skip them."""


def _time_input(c_noise: ArrayLike) -> Array:
    return jnp.asarray(c_noise, dtype=jnp.result_type(float))


class SinusoidalEmbedding(nnx.Module):
    """Transformer embedding ``e(c) = [cos(c f_k), sin(c f_k)]_{k<dim/2}``, ``f_k = P^{−2k/dim}``
    with ``P = max_period``; no parameters."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        if not (isinstance(dim, int) and dim >= 2 and dim % 2 == 0):
            raise ValueError(f"dim must be an even int ≥ 2, got {dim!r}")
        if not max_period > 1:
            raise ValueError(f"max_period must be > 1, got {max_period}")
        self.dim = dim
        self.max_period = float(max_period)

    def __call__(self, c_noise: ArrayLike) -> Array:
        c = _time_input(c_noise)
        half = self.dim // 2
        freqs = self.max_period ** (-jnp.arange(half, dtype=c.dtype) / half)
        angles = c[..., None] * freqs
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class FourierEmbedding(nnx.Module):
    """Gaussian random Fourier features ``e(c) = [sin 2π f c, cos 2π f c]``, ``f ~ N(0, scale²)``
    of size ``dim/2``, drawn once and frozen (``FrozenFrequencies``)."""

    def __init__(self, dim: int, scale: float = 16.0, *, rngs: nnx.Rngs):
        if not (isinstance(dim, int) and dim >= 2 and dim % 2 == 0):
            raise ValueError(f"dim must be an even int ≥ 2, got {dim!r}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.dim = dim
        self.frequencies = FrozenFrequencies(scale * jax.random.normal(rngs.params(), (dim // 2,)))

    def __call__(self, c_noise: ArrayLike) -> Array:
        c = _time_input(c_noise)
        angles = 2 * jnp.pi * c[..., None] * self.frequencies[...].astype(c.dtype)
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class _Conditioning(nnx.Module):
    """``cond = SiLU(W e(c) + b + E[label])`` of width ``features``; row ``num_classes`` of ``E``
    is the null label used when ``label is None``. Without classes there is no ``E``. Labels
    outside ``[0, num_classes]`` raise when concrete; traced ones are not checked (``jnp.take``:
    NaN above the range, negative ones wrap)."""

    def __init__(
        self,
        embedding: nnx.Module,
        features: int,
        num_classes: int | None,
        *,
        dtype: DTypeLike,
        param_dtype: DTypeLike,
        rngs: nnx.Rngs,
    ):
        dim = getattr(embedding, "dim", None)
        if not isinstance(dim, int):
            raise TypeError(f"embedding must be an nnx.Module with an int attribute dim, got {type(embedding).__name__}")
        if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"num_classes must be None or an int ≥ 1, got {num_classes!r}")
        self.embedding = embedding
        self.linear = nnx.Linear(dim, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = num_classes
        self.classes = (
            None
            if num_classes is None
            else nnx.Embed(num_classes + 1, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def __call__(self, c_noise: Array, label: ArrayLike | None) -> Array:
        h = self.linear(self.embedding(c_noise))
        if self.classes is None:
            if label is not None:
                raise ValueError("a label was given to a network without classes (built with num_classes=None)")
            return nnx.silu(h)
        if label is None:
            label = jnp.full(c_noise.shape, self.num_classes, dtype=jnp.int32)
        label = jnp.asarray(label)
        if not jnp.issubdtype(label.dtype, jnp.integer):
            raise TypeError(f"label must be an integer array, got dtype {label.dtype}")
        if label.shape != c_noise.shape:
            raise ValueError(f"label must have shape {c_noise.shape} (one class per example), got {label.shape}")
        require((label >= 0) & (label <= self.num_classes), f"labels must lie in [0, {self.num_classes}]")
        return nnx.silu(h + self.classes(label))


def _check_batch(x: Array, c_noise: ArrayLike) -> Array:
    c = _time_input(c_noise)
    if c.shape != x.shape[:1]:
        raise ValueError(f"c_noise must have shape {x.shape[:1]} (one time per example), got {c.shape}")
    return c


class MLP(nnx.Module):
    """Residual MLP on vectors ``(B, dim)`` with ``depth`` hidden layers of width ``hidden``:

        h₁ = W_in x,   h_{k+1} = h_k + W_k SiLU(h_k + cond),   y = W_out SiLU(h_depth + cond).

    ``y`` has ``out_features`` entries (default ``dim``; e.g. class logits for a noise-conditional
    classifier). ``embedding`` defaults to ``SinusoidalEmbedding(64)``. No normalisation layers: a LayerNorm
    discards the amplitude of ``x`` that an ε-prediction ``≈ x/σ`` at large noise needs (on an
    8-component ring its samples were three times further from the data).
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: int = 256,
        depth: int = 3,
        embedding: nnx.Module | None = None,
        num_classes: int | None = None,
        out_features: int | None = None,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_features = dim if out_features is None else out_features
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("out_features", out_features)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dim = dim
        embedding = SinusoidalEmbedding(64) if embedding is None else embedding
        self.conditioning = _Conditioning(embedding, hidden, num_classes, **kw)
        self.input = nnx.Linear(dim, hidden, **kw)
        self.linears = nnx.List([nnx.Linear(hidden, hidden, **kw) for _ in range(depth - 1)])
        self.output = nnx.Linear(hidden, out_features, **kw)

    def __call__(self, x: Array, c_noise: ArrayLike, label: ArrayLike | None = None) -> Array:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP expects x of shape (B, {self.dim}), got {x.shape}")
        cond = self.conditioning(_check_batch(x, c_noise), label)
        h = self.input(x)
        for linear in self.linears:
            h = h + linear(nnx.silu(h + cond))
        return self.output(nnx.silu(h + cond)).astype(x.dtype)


class ResidualBlock(nnx.Module):
    """``x ↦ skip(x) + conv₂(SiLU(GN(conv₁(SiLU(GN(x))) + W cond)))`` on NHWC images: 3×3 convs,
    ``skip`` a 1×1 conv when the channel count changes, else the identity."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_features: int,
        *,
        groups: int = 8,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.GroupNorm(in_channels, num_groups=groups, **kw)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), **kw)
        self.cond = nnx.Linear(cond_features, out_channels, **kw)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=groups, **kw)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), **kw)
        self.skip = None if in_channels == out_channels else nnx.Conv(in_channels, out_channels, (1, 1), **kw)

    def __call__(self, x: Array, cond: Array) -> Array:
        h = self.conv1(nnx.silu(self.norm1(x))) + self.cond(cond)[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class SelfAttention(nnx.Module):
    """``x + W_o Attention(q, k, v)`` over the ``H·W`` positions of NHWC images, ``(q, k, v) =
    W_qkv GroupNorm(x)`` split into ``heads`` heads, ``softmax(q kᵀ/√d)`` in float32. No positional
    encoding: the block is equivariant to permutations of the positions."""

    def __init__(
        self,
        channels: int,
        *,
        heads: int = 1,
        groups: int = 8,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.norm = nnx.GroupNorm(channels, num_groups=groups, **kw)
        self.qkv = nnx.Linear(channels, 3 * channels, **kw)
        self.out = nnx.Linear(channels, channels, **kw)

    def __call__(self, x: Array) -> Array:
        b, height, width, channels = x.shape
        d = channels // self.heads
        qkv = self.qkv(self.norm(x)).reshape(b, height * width, 3, self.heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, height, width, channels)
        return x + self.out(attended)


class _Stage(nnx.Module):
    """A residual block followed by self-attention (at attention levels)."""

    def __init__(self, in_channels: int, out_channels: int, cond_features: int, attention: bool, heads: int, **kw):
        self.block = ResidualBlock(in_channels, out_channels, cond_features, **kw)
        self.attention = SelfAttention(out_channels, heads=heads, **kw) if attention else None

    def __call__(self, x: Array, cond: Array) -> Array:
        h = self.block(x, cond)
        return h if self.attention is None else self.attention(h)


class _Upsample(nnx.Module):
    """Nearest-neighbour ×2 then a 3×3 convolution."""

    def __init__(self, in_channels: int, out_channels: int, **kw):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), **kw)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class UNet(nnx.Module):
    """U-Net on NHWC images ``(B, H, W, channels)`` (DDPM style).

    Level ``l`` works at resolution ``H/2^l`` with ``base · multipliers[l]`` channels: on the way
    down ``num_res_blocks`` residual blocks (each output kept as a skip), then a strided conv; on
    the way up as many blocks, each on ``concat(h, skip)``, then nearest upsampling and a conv to
    the width of the level above.
    Levels in ``attention_levels`` add self-attention (``heads`` heads) after each block; every
    GroupNorm has ``groups`` groups. Output: ``conv(SiLU(GroupNorm(h)))``. Time (and label) enter every block through ``cond`` of width
    ``embedding_dim``; ``embedding`` defaults to ``SinusoidalEmbedding(embedding_dim)``.
    ``H`` and ``W`` must be divisible by ``2^(len(multipliers) − 1)``.
    """

    def __init__(
        self,
        channels: int = 1,
        *,
        base: int = 32,
        multipliers: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (1,),
        heads: int = 1,
        groups: int = 8,
        embedding_dim: int = 128,
        embedding: nnx.Module | None = None,
        num_classes: int | None = None,
        dtype: DTypeLike = jnp.float32,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        multipliers, attention_levels = tuple(multipliers), tuple(attention_levels)
        for name, value in (("channels", channels), ("base", base), ("num_res_blocks", num_res_blocks),
                            ("heads", heads), ("groups", groups), ("embedding_dim", embedding_dim)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if not multipliers or not all(isinstance(m, int) and m >= 1 for m in multipliers):
            raise ValueError(f"multipliers must be a non-empty sequence of ints ≥ 1, got {multipliers}")
        widths = [base * m for m in multipliers]
        if any(w % groups for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by groups={groups}")
        if not all(level in range(len(widths)) for level in attention_levels):
            raise ValueError(f"attention_levels {attention_levels} must be levels in 0..{len(widths) - 1}")
        layer_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(groups=groups, **layer_kw)
        self.channels = channels
        self.factor = 2 ** (len(widths) - 1)
        embedding = SinusoidalEmbedding(embedding_dim) if embedding is None else embedding
        self.conditioning = _Conditioning(embedding, embedding_dim, num_classes, **layer_kw)
        self.input = nnx.Conv(channels, base, (3, 3), **layer_kw)
        down, downsamples, skips, width = [], [], [], base
        for level, w in enumerate(widths):
            stages = []
            for _ in range(num_res_blocks):
                stages.append(_Stage(width, w, embedding_dim, level in attention_levels, heads, **kw))
                skips.append(w)
                width = w
            down.append(nnx.List(stages))
            if level < len(widths) - 1:
                downsamples.append(nnx.Conv(width, width, (3, 3), strides=2, **layer_kw))
        up, upsamples = [], []
        for level in reversed(range(len(widths))):
            stages = []
            for _ in range(num_res_blocks):
                stages.append(_Stage(width + skips.pop(), widths[level], embedding_dim, level in attention_levels, heads, **kw))
                width = widths[level]
            up.append(nnx.List(stages))
            if level > 0:
                upsamples.append(_Upsample(width, widths[level - 1], **layer_kw))
                width = widths[level - 1]
        self.down, self.downsamples = nnx.List(down), nnx.List(downsamples)
        self.up, self.upsamples = nnx.List(up), nnx.List(upsamples)
        self.output_norm = nnx.GroupNorm(width, num_groups=groups, **layer_kw)
        self.output = nnx.Conv(width, channels, (3, 3), **layer_kw)

    def __call__(self, x: Array, c_noise: ArrayLike, label: ArrayLike | None = None) -> Array:
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"UNet expects NHWC images (B, H, W, {self.channels}), got shape {x.shape}")
        if x.shape[1] % self.factor or x.shape[2] % self.factor:
            raise ValueError(f"H and W must be divisible by {self.factor} (2^(levels − 1)), got {x.shape[1:3]}")
        cond = self.conditioning(_check_batch(x, c_noise), label)
        h, skips = self.input(x), []
        for level, stages in enumerate(self.down):
            for stage in stages:
                h = stage(h, cond)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        for level, stages in enumerate(self.up):
            for stage in stages:
                h = stage(jnp.concatenate([h, skips.pop()], axis=-1), cond)
            if level < len(self.upsamples):
                h = self.upsamples[level](h)
        return self.output(nnx.silu(self.output_norm(h))).astype(x.dtype)
