import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

import sde_diffusion as sd


@pytest.mark.parametrize("sde", [sd.VP(), sd.EDM(), sd.RectifiedFlow(), sd.CosineVP()], ids=lambda s: type(s).__name__)
def test_every_prediction_gives_the_oracle_score_and_denoiser(x64, sde):
    data = sd.GaussianMixture.ring(jax.random.key(0))
    t = 0.3 * sde.t1 + 0.7 * sde.t0
    x = jnp.array([0.4, -0.9])
    score, denoised = data.marginal_score(sde, t, x), data.denoiser(sde, t, x)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    eps = (x - alpha * denoised) / sigma
    dalpha, dsigma = jax.grad(sde.alpha)(t), jax.grad(sde.sigma)(t)
    predictions = [
        sd.Score(lambda t_, x_: data.marginal_score(sde, t_, x_)),
        sd.Denoiser(lambda t_, x_: data.denoiser(sde, t_, x_)),
        sd.Noise(lambda t_, x_: (x_ - sde.alpha(t_) * data.denoiser(sde, t_, x_)) / sde.sigma(t_)),
        sd.Velocity(lambda t_, x_: dalpha * data.denoiser(sde, t_, x_) + dsigma * eps),
    ]
    for p in predictions:
        np.testing.assert_allclose(p.score(sde, t, x), score, rtol=1e-8, err_msg=type(p).__name__)
        np.testing.assert_allclose(p.denoiser(sde, t, x), denoised, rtol=1e-8, err_msg=type(p).__name__)


def test_rectified_flow_velocity_is_noise_minus_data(x64):
    sde = sd.RectifiedFlow()
    x0, eps, t = jnp.array([1.0, -2.0]), jnp.array([0.3, 0.5]), 0.4
    x = (1 - t) * x0 + t * eps
    np.testing.assert_allclose(sd.Velocity(lambda t_, x_: eps - x0).denoiser(sde, t, x), x0, rtol=1e-12)


def test_generic_sde_needs_a_score():
    sde = sd.SDE(lambda t, x: -x, lambda t, x: 1.0, prior=sd.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="ScheduleSDE"):
        sd.Denoiser(lambda t, x: x).score(sde, 0.5, jnp.ones(2))
    with pytest.raises(TypeError, match="prediction"):
        sd.sample(sde, 3.0, jax.random.key(0), (2, 1), method=sd.ReverseDiffusion(2))


@pytest.mark.parametrize("sde", [sd.VP(), sd.EDM(), sd.CosineVP()], ids=lambda s: type(s).__name__)
def test_edm_preconditioning_with_zero_network_is_the_exact_gaussian_denoiser(x64, sde):
    # data N(0, σd² I): E[x0 | x_t] = σd²/(σ̃² + σd²) · x/α = c_skip x̂, so F = 0 is exact
    sigma_data, t, x = 0.7, 0.4 * sde.t1 + 0.6 * sde.t0, jnp.array([0.4, -0.9, 2.0])
    data = sd.GaussianMixture(jnp.ones(1), jnp.zeros((1, 3)), jnp.full((1, 3), sigma_data**2))
    model = sd.EDMPreconditioned(lambda t_, x_: jnp.zeros_like(x_), sigma_data=sigma_data)
    np.testing.assert_allclose(model.denoiser(sde, t, x), data.denoiser(sde, t, x), rtol=1e-10)
    np.testing.assert_allclose(model.score(sde, t, x), data.marginal_score(sde, t, x), rtol=1e-10)
    with pytest.raises(ValueError, match="sigma_data"):
        sd.EDMPreconditioned(lambda t_, x_: x_, sigma_data=0.0)


def test_edm_preconditioning_feeds_the_network_unit_variance_inputs(x64):
    sde, sigma_data = sd.EDM(), 0.5
    seen = []
    model = sd.EDMPreconditioned(lambda t_, x_: seen.append(x_) or x_, sigma_data=sigma_data)
    t, x = 3.0, jnp.array([1.0, 2.0])
    model.denoiser(sde, t, x)
    np.testing.assert_allclose(seen[0], x / np.sqrt(t**2 + sigma_data**2), rtol=1e-12)


class _Affine(nnx.Module):
    """y = W x + c_noise · b, on batches."""

    def __init__(self, dim, rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.b = nnx.Param(jnp.arange(dim, dtype=jnp.float32))

    def __call__(self, x, c):
        return self.linear(x) + c[:, None] * self.b


def test_network_applies_the_nnx_module_to_one_example_with_its_noise_level():
    sde = sd.EDM()
    net = _Affine(3, nnx.Rngs(0))
    fn = sd.Network(net, sde)
    x, t = jnp.array([0.5, -1.0, 2.0]), 2.0
    np.testing.assert_allclose(sd.noise_level(sde, t), np.log(t) / 4, rtol=1e-6)
    expected = net(x[None], jnp.array([np.log(t) / 4]))[0]
    np.testing.assert_allclose(fn(t, x), expected, rtol=1e-6)
    batched = jax.jit(jax.vmap(sd.Noise(fn).denoiser, in_axes=(None, None, 0)))(sde, t, jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(batched[0], x - t * expected, rtol=1e-5)
    generic = sd.SDE(lambda t_, x_: -x_, lambda t_, x_: 1.0, t0=0.0, t1=2.0, prior=sd.Normal(0.0, 1.0))
    np.testing.assert_allclose(sd.noise_level(generic, 0.5), 0.25)
    assert np.isfinite(sd.noise_level(sd.VP(), 0.0))
    with pytest.raises(TypeError, match="nnx.Module"):
        sd.Network(lambda x, c: x, sde)


def test_with_label_conditions_every_network_without_recompiling():
    sde = sd.VP()
    net = sd.MLP(2, hidden=16, depth=2, num_classes=3, rngs=nnx.Rngs(0))
    model = sd.EDMPreconditioned(sd.Network(net, sde))
    x, t = jnp.array([0.3, -0.2]), 0.4
    # the label reaches the network: the class embedding row of that label
    for label in (0, 2, None):
        row = 3 if label is None else label
        expected = net(x[None], sd.noise_level(sde, t)[None], jnp.array([row]))[0]
        np.testing.assert_allclose(sd.with_label(model, label).fn(t, x), expected, rtol=1e-6)
    assert sd.with_label(sd.with_label(model, 1), None).fn.label is None
    # vmapped over labels, or a batch of labels on a batch = one call per label
    labels = jnp.array([0, 1, 2])
    batched = jax.vmap(lambda y: sd.with_label(model, y).denoiser(sde, t, x))(labels)
    on_batch = sd.with_label(model, labels).denoiser(sde, jnp.full(3, t), jnp.stack([x] * 3))
    for k in range(3):
        np.testing.assert_allclose(batched[k], sd.with_label(model, k).denoiser(sde, t, x), rtol=1e-5)
        np.testing.assert_allclose(on_batch[k], batched[k], rtol=1e-5)
    traces = []

    @jax.jit
    def denoise(model, x):
        traces.append(1)
        return model.denoiser(sde, t, x)

    for label in (0, 1, 2):
        denoise(sd.with_label(model, label), x)
    assert len(traces) == 1
    with pytest.raises(TypeError, match="sd.Network"):
        sd.with_label(sd.Score(lambda t, x: -x), 1)
    with pytest.raises(ValueError, match="one integer class"):
        sd.with_label(model, 1.5)
    with pytest.raises(ValueError, match="one integer class"):
        sd.Network(net, sde, label=jnp.zeros((2, 2), int))
    with pytest.raises(ValueError, match="batch of labels"):
        sd.Network(net, sde, label=jnp.array([0, 1]))(t, x)
    unconditional = sd.Network(sd.MLP(2, hidden=16, depth=2, rngs=nnx.Rngs(0)), sde)
    with pytest.raises(ValueError, match="without classes"):
        sd.with_label(unconditional, 1)(t, x)


@pytest.mark.parametrize("prediction", [sd.Score, sd.Denoiser, sd.Noise, sd.Velocity, sd.EDMPreconditioned])
def test_parametrizations_on_a_batch_equal_vmap_over_examples(prediction):
    """One network call on the batch (``Network.batch``) gives what vmap over examples gives; so does
    a plain per-example function, which is vmapped."""
    sde = sd.VP()
    net = sd.MLP(2, hidden=16, depth=2, rngs=nnx.Rngs(0))
    t = jnp.array([0.01, 0.3, 0.7, 1.0])
    x = jax.random.normal(jax.random.key(0), (4, 2))
    for fn in (sd.Network(net, sde), lambda s, y: jnp.sin(y) * s):
        model = prediction(fn)
        for what in ("score", "denoiser"):
            expected = jax.vmap(getattr(model, what), in_axes=(None, 0, 0))(sde, t, x)
            np.testing.assert_allclose(getattr(model, what)(sde, t, x), expected, rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(sd.parametrization.predict_batch(model, what, sde, t, x), expected, rtol=2e-5, atol=1e-6)
