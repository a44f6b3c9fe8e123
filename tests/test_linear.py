import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import sde_diffusion as sd


def test_time_invariant_transition_matches_matrix_exponential(x64):
    """F, L constant: Φ = e^{F t}, Q = ∫₀ᵗ e^{F s} L Lᵀ e^{Fᵀ s} ds (Van Loan's block exponential)."""
    fmat = np.array([[-0.5, 1.0], [-1.0, -0.3]])
    lmat = np.array([[0.2], [1.0]])
    sde = sd.LinearSDE(lambda t: jnp.asarray(fmat), lambda t: jnp.asarray(lmat), 0.0, 2.0)
    t = 1.3
    d = 2
    block = np.block([[-fmat, lmat @ lmat.T], [np.zeros((d, d)), fmat.T]]) * t
    expm = scipy.linalg.expm(block)
    phi_exact = expm[d:, d:].T
    q_exact = phi_exact @ expm[:d, d:]
    phi, q = sde.transition(t)
    np.testing.assert_allclose(phi, phi_exact, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(q, q_exact, rtol=1e-8, atol=1e-10)


def test_marginal_and_prior(x64):
    sde = sd.LinearSDE(lambda t: -(1 + t) * jnp.eye(2), lambda t: jnp.sqrt(2 * (1 + t)) * jnp.eye(2), 0.0, 1.0)
    # scalar ODEs: φ = exp(−t − t²/2); q solves q' = −2(1+t) q + 2(1+t) → q = 1 − φ²
    t = 0.7
    phi = math.exp(-t - t**2 / 2)
    m = sde.marginal(t, jnp.array([1.0, -2.0]))
    np.testing.assert_allclose(m.mean, phi * np.array([1.0, -2.0]), rtol=1e-9)
    np.testing.assert_allclose(m.covariance, (1 - phi**2) * np.eye(2), rtol=1e-9)
    np.testing.assert_allclose(sde.prior.covariance, (1 - math.exp(-3)) * np.eye(2), rtol=1e-9)


def test_transition_at_t0_is_identity(x64):
    sde = sd.CriticallyDampedLangevin(n=1)
    phi, q = sde.transition(0.0)
    np.testing.assert_allclose(phi, np.eye(2))
    np.testing.assert_allclose(q, 0.0)


def test_cld_closed_form(x64):
    """CLD's F and L are constant: Φ = e^{Ft} (scipy) and Q = ∫₀ᵗ e^{Fs} L Lᵀ e^{Fᵀs} ds by quadrature."""
    sde = sd.CriticallyDampedLangevin(n=1)
    t = 0.6
    fmat = np.asarray(sde.drift_matrix(0.0))
    lmat = np.asarray(sde.diffusion_matrix(0.0))
    phi_exact = scipy.linalg.expm(fmat * t)
    # Q by quadrature of e^{Fs} L Lᵀ e^{Fᵀs} over [0, t] (Gauss–Legendre, 40 nodes)
    nodes, weights = np.polynomial.legendre.leggauss(40)
    s = 0.5 * t * (nodes + 1)
    q_exact = sum(
        0.5 * t * w * scipy.linalg.expm(fmat * si) @ lmat @ lmat.T @ scipy.linalg.expm(fmat * si).T
        for si, w in zip(s, weights)
    )
    phi, q = sde.transition(t)
    np.testing.assert_allclose(phi, phi_exact, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(q, q_exact, rtol=1e-8, atol=1e-10)
    # at t1 the velocity marginal approaches its stationary variance M
    assert abs(float(sde.prior.covariance[1, 1]) - sde.mass) < 0.05 * sde.mass


def test_invalid_linear_sde():
    with pytest.raises(ValueError, match="square"):
        sd.LinearSDE(lambda t: jnp.ones((2, 3)), lambda t: jnp.ones((2, 1)))
    with pytest.raises(ValueError, match=r"\(2, m\)"):
        sd.LinearSDE(lambda t: jnp.eye(2), lambda t: jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="mass"):
        sd.CriticallyDampedLangevin(n=2, mass=-1.0)
    with pytest.raises(RuntimeError, match="t0, t1"):
        sd.CriticallyDampedLangevin(n=1).transition(2.0)
