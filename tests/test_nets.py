from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sde_diffusion as sd
from sde_diffusion.nets import FrozenFrequencies, SelfAttention


@cache
def _nets(dtype=jnp.float32, num_classes=3):
    """Default-size MLP on (5, 2) vectors and U-Net on (2, 8, 4, 1) images with 3 classes (the same
    weights for every dtype; built once: initialisers compile once per shape)."""
    mlp = sd.nets.MLP(2, num_classes=num_classes, dtype=dtype, rngs=nnx.Rngs(0))
    unet = sd.nets.UNet(num_classes=num_classes, dtype=dtype, rngs=nnx.Rngs(0))
    return [(mlp, _normal(1, (5, 2))), (unet, _normal(2, (2, 8, 4, 1)))]


@cache
def _default_nets():
    return sd.nets.MLP(2, rngs=nnx.Rngs(0)), sd.nets.UNet(rngs=nnx.Rngs(0))


def _c(x):
    return np.linspace(-1.0, 1.5, x.shape[0], dtype=np.float32)


def _normal(seed, shape):
    # numpy inputs: an eager jax op would compile once per shape
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _apply(net, x, c, label=None):
    """``net(x, c, label)`` compiled once per network structure (faster than op-by-op)."""
    return _jit_apply(*nnx.split(net), x, c, label)


# tests run each compiled function a few times: skip XLA's backend optimisation (halves compile time)
_jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@partial(_jit, static_argnums=0)
def _jit_apply(graph, state, x, c, label):
    return nnx.merge(graph, state)(x, c, label)


def _count(state):
    return sum(v.size for v in jax.tree.leaves(state))


def _matmul_operand_dtypes(jaxpr):
    """dtypes of every operand of dot_general / conv in a jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found += [v.aval.dtype for v in eqn.invars]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _matmul_operand_dtypes(inner)
    return found


def test_sinusoidal_embedding_matches_its_formula():
    c = np.array([-1.3, 0.0, 0.7, 2.5])
    freqs = 100.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.cos(np.outer(c, freqs)), np.sin(np.outer(c, freqs))], axis=1)
    np.testing.assert_allclose(sd.nets.SinusoidalEmbedding(8, max_period=100)(c), expected, rtol=1e-6, atol=1e-6)
    assert _count(nnx.state(sd.nets.SinusoidalEmbedding(8))) == 0
    with pytest.raises(ValueError, match="even"):
        sd.nets.SinusoidalEmbedding(7)


def test_fourier_frequencies_are_frozen_state_not_params():
    emb = sd.nets.FourierEmbedding(64, scale=3.0, rngs=nnx.Rngs(0))
    freqs = np.asarray(emb.frequencies[...])
    assert freqs.shape == (32,) and 2.0 < freqs.std() < 4.5
    c = np.array([-0.5, 0.2])
    angles = 2 * np.pi * np.outer(c, freqs)
    np.testing.assert_allclose(emb(c), np.concatenate([np.sin(angles), np.cos(angles)], 1), rtol=1e-5, atol=1e-5)
    assert _count(nnx.state(emb, nnx.Param)) == 0 and _count(nnx.state(emb, FrozenFrequencies)) == 32
    # an MLP on 64 Fourier features has exactly the trainable parameters of one on 64 sinusoidal ones
    fourier, sinusoidal = sd.nets.MLP(2, embedding=emb, rngs=nnx.Rngs(0)), _default_nets()[0]
    assert _count(nnx.state(fourier, nnx.Param)) == _count(nnx.state(sinusoidal, nnx.Param))
    assert _count(nnx.state(fourier)) == _count(nnx.state(sinusoidal)) + 32


def test_default_sizes():
    mlp, unet = _default_nets()
    # MLP: input 2·256+256, conditioning 64·256+256, 2 hidden 256²+256, output 256·2+2
    assert _count(nnx.state(mlp, nnx.Param)) == 768 + 16640 + 2 * 65792 + 514
    assert 100_000 <= _count(nnx.state(unet, nnx.Param)) <= 400_000


def test_output_shapes_and_dtypes():
    for net, x in _nets():
        y = _apply(net, x, _c(x))
        assert y.shape == x.shape and y.dtype == jnp.float32


def test_examples_are_processed_independently():
    # normalisation statistics are per example: a batch gives what its examples give one by one
    # (sd.Network calls the net on batches of one)
    for net, x in _nets():
        c, label = _c(x), np.arange(x.shape[0]) % 4
        one_by_one = [_apply(net, x[i : i + 1], c[i : i + 1], label[i : i + 1]) for i in range(x.shape[0])]
        np.testing.assert_allclose(_apply(net, x, c, label), np.concatenate(one_by_one), rtol=1e-5, atol=1e-6)


def test_time_and_label_change_the_output_and_none_is_the_null_label():
    for net, x in _nets():
        c, zeros = _c(x), np.zeros(x.shape[0], int)
        y = _apply(net, x, c)
        np.testing.assert_array_equal(y, _apply(net, x, c, zeros + 3))
        assert not np.allclose(_apply(net, x, c, zeros), y, atol=1e-4)
        assert not np.allclose(_apply(net, x, c, zeros), _apply(net, x, c, zeros + 1), atol=1e-4)
        assert not np.allclose(_apply(net, x, c + 0.3), y, atol=1e-4)
        with pytest.raises(TypeError, match="integer"):
            _apply(net, x, c, np.zeros(x.shape[0], np.float32))
        with pytest.raises(ValueError, match="label must have shape"):
            _apply(net, x, c, np.zeros(x.shape[0] + 1, int))
        with pytest.raises(ValueError, match="c_noise must have shape"):
            _apply(net, x, c[:1])


def test_clear_errors():
    (mlp, v), (unet, img) = _nets()
    with pytest.raises(ValueError, match="num_classes=None"):
        _default_nets()[0](v, _c(v), np.zeros(v.shape[0], int))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        mlp(v, _c(v), np.arange(v.shape[0]))
    with pytest.raises(ValueError, match=r"MLP expects x of shape \(B, 2\)"):
        mlp(np.ones((5, 3), np.float32), _c(v))
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
        unet(np.ones((2, 8, 4, 3), np.float32), _c(img))
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
        unet(img[0], _c(img))
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(img[:, :3], _c(img))
    with pytest.raises(ValueError, match="groups"):
        sd.nets.UNet(base=12, groups=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention_levels"):
        sd.nets.UNet(attention_levels=(2,), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="dim"):
        sd.nets.MLP(2, embedding=nnx.Linear(1, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        sd.nets.MLP(2, num_classes=0, rngs=nnx.Rngs(0))


def test_self_attention_is_equivariant_to_permutations_of_positions():
    block = _nets()[1][0].down[1][0].attention  # the U-Net's block at 4×2, 64 channels
    assert isinstance(block, SelfAttention)
    graph, state = nnx.split(block)
    apply = _jit(lambda state_, x_: nnx.merge(graph, state_)(x_))
    x = _normal(0, (2, 3, 4, 64))
    perm = np.random.default_rng(0).permutation(12)

    def permute(a):
        return a.reshape(2, 12, 64)[:, perm].reshape(a.shape)

    y = np.asarray(apply(state, x))
    np.testing.assert_allclose(apply(state, permute(x)), permute(y), rtol=1e-5, atol=1e-5)
    # and it mixes positions: changing one position changes the output at every other one
    x[:, 0, 0] += 1.0
    changed = np.abs(np.asarray(apply(state, x)) - y).reshape(2, 12, 64)
    assert np.all(changed[:, 1:].max(-1) > 1e-6)


def test_networks_sample_through_ddim():
    sde = sd.VP()
    for net, shape in zip(_default_nets(), [(16, 2), (4, 8, 8, 1)]):
        model = sd.Noise(sd.Network(net, sde))
        samples, _ = sd.sample(sde, model, jax.random.key(0), shape, method=sd.DDIM(num_steps=3), t_end=1e-3)
        assert samples.shape == shape and np.all(np.isfinite(samples))


def test_bfloat16_compute_with_float32_params_is_close_to_float32_in_outputs_and_gradients():
    for (net16, x), (net32, _) in zip(_nets(jnp.bfloat16), _nets()):
        # every matrix product and convolution runs in bfloat16
        operands = _matmul_operand_dtypes(jax.make_jaxpr(lambda x_: net16(x_, _c(x_)))(x).jaxpr)
        assert operands and all(d == jnp.bfloat16 for d in operands), set(operands)
        graph16, params, rest = nnx.split(net16, nnx.Param, ...)
        graph32, params32, _ = nnx.split(net32, nnx.Param, ...)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        jax.tree.map(np.testing.assert_array_equal, params, params32)  # the same weights
        target = _normal(5, x.shape)

        @partial(_jit, static_argnums=1)
        def output_and_grad(p, graph):
            y, pullback = jax.vjp(lambda p_: nnx.merge(graph, p_, rest)(x, _c(x)), p)
            return y, pullback(target)[0]  # the gradient of Σ y · target

        (y16, g16), (y32, g32) = output_and_grad(params, graph16), output_and_grad(params, graph32)
        assert y16.shape == x.shape and y16.dtype == jnp.float32
        error = np.linalg.norm(np.asarray(y16) - np.asarray(y32)) / np.linalg.norm(np.asarray(y32))
        assert 0 < error < 3e-2
        for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
            assert a.dtype == jnp.float32
            a, b = np.asarray(a), np.asarray(b)
            assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b)
