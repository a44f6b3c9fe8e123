import jax.numpy as jnp
import pytest

import sde_diffusion as sd


def test_noise_kind_from_diffusion_shape():
    x = jnp.ones(3)
    scalar = sd.SDE(lambda t, x: -x, lambda t, x: 1.0)
    diagonal = sd.SDE(lambda t, x: -x, lambda t, x: jnp.arange(1.0, 4.0))
    matrix = sd.SDE(lambda t, x: -x, lambda t, x: jnp.ones((3, 5)))
    assert isinstance(scalar.noise(x), sd.ElementwiseNoise)
    assert isinstance(diagonal.noise(x), sd.ElementwiseNoise)
    assert isinstance(matrix.noise(x), sd.MatrixNoise)
    assert matrix.noise(x).shape((3,), (3, 5)) == (5,)


@pytest.mark.parametrize(
    "drift, diffusion, message",
    [
        (lambda t, x: x[:2], lambda t, x: 1.0, "drift"),
        (lambda t, x: x, lambda t, x: jnp.ones(2), "diffusion returned shape"),
        (lambda t, x: x, lambda t, x: jnp.ones((2, 3)), "diffusion returned shape"),
    ],
)
def test_shape_mismatch_is_reported(drift, diffusion, message):
    with pytest.raises(ValueError, match=message):
        sd.SDE(drift, diffusion).noise(jnp.ones(3))


def test_construction_errors():
    with pytest.raises(TypeError, match="callables"):
        sd.SDE(1.0, lambda t, x: 1.0)
    with pytest.raises(ValueError, match="t0 < t1"):
        sd.SDE(lambda t, x: x, lambda t, x: 1.0, t0=1.0, t1=1.0)
    with pytest.raises(ValueError, match="no prior"):
        sd.SDE(lambda t, x: x, lambda t, x: 1.0).prior


def test_state_dependence_is_detected():
    x = jnp.ones(2)
    assert sd.SDE(lambda t, x: x, lambda t, x: 0.3 * x).diffusion_depends_on_x(x)
    assert sd.SDE(lambda t, x: x, lambda t, x: jnp.sqrt(1 + x[0] ** 2)).diffusion_depends_on_x(x)
    assert not sd.SDE(lambda t, x: x, lambda t, x: jnp.sqrt(t) + jnp.zeros(2)).diffusion_depends_on_x(x)
    assert not sd.SDE(lambda t, x: x, lambda t, x: 2.0).diffusion_depends_on_x(x)
    assert not sd.VP().diffusion_depends_on_x(x)


