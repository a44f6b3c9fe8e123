"""Multistep exponential integrators of the PF ODE (and their stochastic variants).

With ``λ = log(α/σ)`` and the denoiser ``D``, the PF ODE of a ``ScheduleSDE`` is solved exactly
in its linear part (Lu et al. 2022):

    x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1} ∫_{λ_i}^{λ_{i+1}} e^{λ − λ_{i+1}} D_λ dλ,

and the methods differ in how they extrapolate ``D`` (or ``ε``) from the last few evaluations.
Every step is linear in the history, ``x_{i+1} = a_i x_i + Σ_j b_ij P_{i−j} (+ c_i z_i)``, so the
coefficients are computed for the whole grid before the loop and the loop itself is one model
call and one fused combination per step (``lax.scan``, no Python loop); a corrector (UniPC) is
folded into the next step's coefficients (``_coefficients``). One evaluation per step:
``nfe = num_steps``. Warm-up steps use the orders the history allows; ``lower_order_final`` lowers
the order of the last steps (``k ≤ N − i``) as DPM-Solver and UniPC do; a step to ``σ = 0`` is
first order.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .grids import AbstractTimeGrid, UniformLogSNR
from .sample import AbstractGridSampler, GridCoordinates, sampling_noise


class AbstractMultistep(AbstractGridSampler):
    """One model call per step; subclasses give the coefficients of each order."""

    num_steps: eqx.AbstractVar[int]
    grid: eqx.AbstractVar[AbstractTimeGrid]
    order: eqx.AbstractVar[int]
    lower_order_final: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def predictor(self, c: GridCoordinates, i: Array, k: int) -> tuple[Array, Array]:
        """``(a_i, b_i)`` of the order-``k`` step ``i``; ``b_i`` of length ``order`` (P_i first)."""

    def corrector(self, c: GridCoordinates, i: Array, k: int) -> tuple[Array, Array, Array] | None:
        """``(a_i, b_i, b_new)``: ``x_{i+1} = a x_i + Σ b_j P_{i−j} + b_new P_{i+1}`` re-using the
        evaluation at the predicted point (UniPC); ``None`` for no corrector."""
        return None

    def noise_scale(self, c: GridCoordinates, i: Array) -> Array | None:
        """Std of the fresh noise added at step ``i``; ``None`` for a deterministic method."""
        return None

    def prediction(self, alpha: Array, sigma: Array, x: Array, denoised: Array) -> Array:
        """The history quantity ``P`` (the denoiser; DEIS uses ``ε``)."""
        return denoised

    def __check_init__(self):
        if self.order not in self.supported_orders:
            raise ValueError(f"{type(self).__name__} supports orders {self.supported_orders}, got {self.order}")

    supported_orders: ClassVar[tuple[int, ...]] = (1, 2, 3)

    def evaluations(self, ends_at_zero_noise):
        return self.num_steps

    def _orders(self, c: GridCoordinates, i: Array) -> Array:
        k = jnp.minimum(self.order, i + 1)
        if self.lower_order_final:
            k = jnp.minimum(k, self.num_steps - i)
        return jnp.where(c.sigma[i + 1] == 0, 1, k)

    def _table(self, c: GridCoordinates, i: Array, rule) -> tuple[Array, ...]:
        """The rule's coefficients at step ``i`` with the order ``_orders`` picks there."""
        per_order = [rule(c, i, k) for k in range(1, self.order + 1)]
        k = self._orders(c, i)
        return tuple(
            jnp.stack([jnp.broadcast_to(entry[n], per_order[-1][n].shape) for entry in per_order])[k - 1]
            for n in range(len(per_order[0]))
        )

    def _coefficients(self, c: GridCoordinates) -> tuple[Array, Array]:
        """``(A, W)`` of every step written in the points where the model is evaluated:
        ``x̃_{i+1} = A_i x̃_i + Σ_j W_ij P_{i−j}``. Without a corrector ``x̃ = x`` and these are the
        predictor's ``(a, b)``. With one, the state ``x_i = c x_{i−1} + Σ β P + β_new P_i`` is
        eliminated through ``x̃_i = a x_{i−1} + Σ b P``: ``x_i = r_i x̃_i + Σ_j v_ij P_{i−j}`` with
        ``r_i = c_{i−1}/a_{i−1}``, ``v_i = (β_new, β − r_i b)_{i−1}``, so ``A_i = a_i r_i`` and
        ``W_i = b_i + a_i v_i``: one combination per step, as for any multistep method."""
        steps = jnp.arange(self.num_steps)
        a, b = jax.vmap(lambda i: self._table(c, i, self.predictor))(steps)
        if self.corrector(c, jnp.array(0), 1) is None:
            return a, b
        if self.noise_scale(c, 0) is not None:
            raise NotImplementedError("a corrector with fresh noise per step is not supported")
        c_, beta, beta_new = jax.vmap(lambda i: self._table(c, i, self.corrector))(steps)
        r = jnp.concatenate([jnp.ones_like(a[:1]), c_[:-1] / a[:-1]])
        v = jnp.concatenate([beta_new[:-1, None], beta[:-1] - r[1:, None] * b[:-1]], axis=1)
        v = jnp.concatenate([jnp.zeros_like(v[:1]), v])
        return a * r, jnp.pad(b, ((0, 0), (0, 1))) + a[:, None] * v

    def integrate(self, denoise, c, x, key, ends_at_zero_noise):
        steps = jnp.arange(self.num_steps)
        a, b = self._coefficients(c)
        # History ring buffer: P_m lives in slot m mod S (no copies per step); weights moved to
        # their slots before the loop.
        slots = b.shape[1]
        slot = (steps[:, None] - jnp.arange(slots)) % slots
        b = jnp.zeros_like(b).at[steps[:, None], slot].set(b)
        noise = jax.vmap(lambda i: self.noise_scale(c, i))(steps) if self.noise_scale(c, 0) is not None else None

        def step(carry, i):
            x_i, history = carry
            p_i = self.prediction(c.alpha[i], c.sigma[i], x_i, denoise(c.ts[i], x_i))
            history = jax.lax.dynamic_update_index_in_dim(history, p_i, i % slots, 0)
            # elementwise, not tensordot: XLA fuses it into one pass over the buffer
            x_next = a[i] * x_i + sum(b[i, j] * history[j] for j in range(slots))
            if noise is not None:
                x_next = x_next + noise[i] * sampling_noise(jax.random.fold_in(key, i), x_i.shape, x_i.dtype)
            return (x_next, history), None

        (x, _), _ = jax.lax.scan(step, (x, jnp.zeros((slots,) + x.shape, x.dtype)), steps)
        return x


def _first_order(c: GridCoordinates, i: Array) -> tuple[Array, Array, Array]:
    """``(σ_{i+1}/σ_i, α_{i+1}(1 − e^{−h}), h)`` with ``h = λ_{i+1} − λ_i``."""
    alpha1, sigma1, lam1 = c.at(i, 1)
    _, sigma0, lam0 = c.at(i, 0)
    h = lam1 - lam0
    return sigma1 / sigma0, -alpha1 * jnp.expm1(-h), h


def _pad(values: list, size: int) -> Array:
    return jnp.stack(list(values) + [jnp.zeros_like(values[0])] * (size - len(values)))


class DPMSolverPP(AbstractMultistep):
    """DPM-Solver++ (Lu et al. 2022) multistep in data prediction: order 1 is DDIM; 2M:
    ``D' = (1 + 1/2r) D_i − (1/2r) D_{i−1}``, ``r = h_{i−1}/h_i``; 3M (see ``dpm_solver_pp_weights``)."""

    num_steps: int = eqx.field(static=True)
    order: int = eqx.field(default=2, static=True)
    grid: AbstractTimeGrid = UniformLogSNR()
    lower_order_final: bool = eqx.field(default=True, static=True)

    def predictor(self, c, i, k):
        alpha1, sigma1, lam1 = c.at(i, 1)
        lams = jnp.stack([c.at(i, -j)[2] for j in range(3)])
        return sigma1 / c.sigma[i], alpha1 * dpm_solver_pp_weights(k, lam1, lams)[: self.order]


def dpm_solver_pp_weights(k: int, lam_next: Array, lams: Array) -> Array:
    """Weights ``w`` (length 3) of ``x_{i+1} = (σ_{i+1}/σ_i) x_i + α_{i+1} Σ_j w_j D_{i−j}`` for the
    order-``k`` DPM-Solver++ step from ``λ_i = lams[0]`` (earlier ``λ_{i−1}, λ_{i−2}`` after it) to
    ``lam_next``: the exponential integral of the degree-``k−1`` extrapolation of ``D`` in ``λ``.

    Order 3 uses ``−2 φ₃ D₂`` where the usual write-up has ``−φ₃ D₂``: ``D₂ ≈ h² D''/2`` and the
    integral needs ``−h² φ₃ D''`` (tests check exactness on quadratics and order 3).
    """
    h = lam_next - lams[0]
    b0, zero = -jnp.expm1(-h), jnp.zeros_like(h)  # (h = ∞ at σ = 0: no 0·∞)
    if k == 1:
        return jnp.stack([b0, zero, zero])
    r0 = (lams[0] - lams[1]) / h
    if k == 2:
        return jnp.stack([b0 * (1 + 0.5 / r0), -b0 * 0.5 / r0, zero])
    r1 = (lams[1] - lams[2]) / h
    # d1_0 = (D_i − D_{i−1})/r0, d1_1 = (D_{i−1} − D_{i−2})/r1 as coefficient vectors
    d1_0 = jnp.stack([1 / r0, -1 / r0, 0 * r0])
    d1_1 = jnp.stack([0 * r1, 1 / r1, -1 / r1])
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = jnp.expm1(-h) / h + 1
    phi3 = phi2 / h - 0.5
    return jnp.stack([b0, zero, zero]) + phi2 * d1 - 2 * phi3 * d2


class DDIM(AbstractMultistep):
    """DDIM (Song et al. 2021) with ``η ∈ [0, 1]``: ``x_{i+1} = α_{i+1} D + √(σ_{i+1}² − c²) ε̂ + c z``,
    ``ε̂ = (x_i − α_i D)/σ_i``, ``c = η σ_{i+1} √(1 − e^{−2h})`` (the DDPM posterior std at ``η = 1``:
    ancestral sampling)."""

    num_steps: int = eqx.field(static=True)
    eta: float = 0.0
    grid: AbstractTimeGrid = UniformLogSNR()
    order: int = eqx.field(default=1, static=True, init=False)
    lower_order_final: bool = eqx.field(default=False, static=True, init=False)
    supported_orders: ClassVar[tuple[int, ...]] = (1,)

    def __check_init__(self):
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")

    def _noise_std(self, c, i):
        sigma1 = c.at(i, 1)[1]
        h = c.at(i, 1)[2] - c.at(i, 0)[2]
        return self.eta * sigma1 * jnp.sqrt(-jnp.expm1(-2 * h))

    def predictor(self, c, i, k):
        alpha1, sigma1, _ = c.at(i, 1)
        alpha0, sigma0, _ = c.at(i, 0)
        a = jnp.sqrt(jnp.maximum(sigma1**2 - self._noise_std(c, i) ** 2, 0)) / sigma0
        return a, jnp.stack([alpha1 - a * alpha0])

    def noise_scale(self, c, i):
        return self._noise_std(c, i) if self.eta > 0 else None


class DPMSolverPP2MSDE(AbstractMultistep):
    """DPM-Solver++(2M) SDE (k-diffusion's midpoint form): with ``η h`` extra decay,

    ``x_{i+1} = (σ_{i+1}/σ_i) e^{−ηh} x_i + α_{i+1}(1 − e^{−(1+η)h}) D' + σ_{i+1} √(1 − e^{−2ηh}) z``.
    """

    num_steps: int = eqx.field(static=True)
    eta: float = 1.0
    grid: AbstractTimeGrid = UniformLogSNR()
    order: int = eqx.field(default=2, static=True, init=False)
    lower_order_final: bool = eqx.field(default=True, static=True)
    supported_orders: ClassVar[tuple[int, ...]] = (2,)

    def __check_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be ≥ 0, got {self.eta}")

    def predictor(self, c, i, k):
        ratio, _, h = _first_order(c, i)
        alpha1 = c.at(i, 1)[0]
        a = ratio * jnp.exp(-self.eta * h)
        b0 = -alpha1 * jnp.expm1(-(1 + self.eta) * h)
        if k == 1:
            return a, _pad([b0], 2)
        r = (c.at(i, 0)[2] - c.at(i, -1)[2]) / h
        return a, jnp.stack([b0 * (1 + 0.5 / r), -b0 * 0.5 / r])

    def noise_scale(self, c, i):
        sigma1 = c.at(i, 1)[1]
        h = c.at(i, 1)[2] - c.at(i, 0)[2]
        return sigma1 * jnp.sqrt(-jnp.expm1(-2 * self.eta * h))


def _lagrange_integrals(nodes: Array, lo: Array, hi: Array, weight, num_points: int = 8) -> Array:
    """``∫_lo^hi ℓ_j(t) w(t) dt`` for the Lagrange basis ``ℓ_j`` on ``nodes`` (Gauss–Legendre)."""
    x, w = np.polynomial.legendre.leggauss(num_points)
    t = 0.5 * (hi - lo) * jnp.asarray(x, lo.dtype) + 0.5 * (hi + lo)
    basis = jnp.stack(
        [
            jnp.prod(jnp.stack([(t - nodes[m]) / (nodes[j] - nodes[m]) for m in range(len(nodes)) if m != j] or [jnp.ones_like(t)]), axis=0)
            for j in range(len(nodes))
        ]
    )
    return 0.5 * (hi - lo) * basis @ (jnp.asarray(w, lo.dtype) * jax.vmap(weight)(t))


class DEIS(AbstractMultistep):
    """DEIS (Zhang & Chen 2023), tAB form: ``ε`` extrapolated by a polynomial in ``t`` through the
    last ``k`` evaluations and integrated exactly against ``dσ̂`` (``x̂ = x/α`` obeys ``dx̂/dσ̂ = ε``):

        x_{i+1} = (α_{i+1}/α_i) x_i + α_{i+1} Σ_j ε_{i−j} ∫_{t_i}^{t_{i+1}} ℓ_j(t) σ̂'(t) dt.
    """

    num_steps: int = eqx.field(static=True)
    order: int = eqx.field(default=3, static=True)
    grid: AbstractTimeGrid = UniformLogSNR()
    lower_order_final: bool = eqx.field(default=True, static=True)

    def prediction(self, alpha, sigma, x, denoised):
        return (x - alpha * denoised) / sigma

    def predictor(self, c, i, k):
        alpha1 = c.at(i, 1)[0]
        alpha0 = c.at(i, 0)[0]
        sigma_hat = lambda t: jnp.exp(-0.5 * c.sde.log_snr(t))
        dsigma_hat = lambda t: jax.jvp(sigma_hat, (t,), (jnp.ones_like(t),))[1]
        nodes = [c.time_at(i - j) for j in range(k)]
        integrals = _lagrange_integrals(nodes, c.ts[i], c.ts[i + 1], dsigma_hat)
        return alpha1 / alpha0, _pad(list(alpha1 * integrals), self.order)


class UniPC(AbstractMultistep):
    """UniPC (Zhao et al. 2023) in data prediction, predictor UniP-k and corrector UniC-k that re-uses
    the next evaluation; ``variant`` picks ``B(h) = h`` ("bh1") or ``B(h) = e^h − 1`` ("bh2")."""

    num_steps: int = eqx.field(static=True)
    order: int = eqx.field(default=3, static=True)
    grid: AbstractTimeGrid = UniformLogSNR()
    variant: str = eqx.field(default="bh2", static=True)
    lower_order_final: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f'variant must be "bh1" or "bh2", got {self.variant!r}')

    def _terms(self, c, i, k):
        """Shared pieces: base step, ``B(h)``, ``D1_m = (P_{i−m} − P_i)/r_m`` and ``(R, b)``."""
        a, _, h = _first_order(c, i)
        alpha1 = c.at(i, 1)[0]
        hh = -h
        h_phi_1 = jnp.expm1(hh)
        b_h = hh if self.variant == "bh1" else h_phi_1
        rks, d1s = [], []
        for m in range(1, k):
            rk = (c.at(i, -m)[2] - c.at(i, 0)[2]) / h
            rks.append(rk)
            d1s.append(jnp.zeros(self.order).at[m].set(1 / rk).at[0].set(-1 / rk))
        rks.append(jnp.ones_like(h))
        rks = jnp.stack(rks)
        rows, rhs = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for q in range(1, k + 1):
            rows.append(rks ** (q - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= q + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        base = jnp.zeros(self.order).at[0].set(-alpha1 * h_phi_1)
        return a, alpha1, b_h, base, d1s, jnp.stack(rows), jnp.stack(rhs)

    def predictor(self, c, i, k):
        a, alpha1, b_h, base, d1s, rows, rhs = self._terms(c, i, k)
        if k == 1:
            return a, base
        rhos = jnp.array([0.5]) if k == 2 else jnp.linalg.solve(rows[:-1, :-1], rhs[:-1])
        return a, base - alpha1 * b_h * jnp.tensordot(rhos, jnp.stack(d1s), axes=1)

    def corrector(self, c, i, k):
        a, alpha1, b_h, base, d1s, rows, rhs = self._terms(c, i, k)
        rhos = jnp.array([0.5]) if k == 1 else jnp.linalg.solve(rows, rhs)
        b = base.at[0].add(alpha1 * b_h * rhos[-1])  # from −α B(h) ρ_last (P_{i+1} − P_i)
        if k > 1:
            b = b - alpha1 * b_h * jnp.tensordot(rhos[:-1], jnp.stack(d1s), axes=1)
        return a, b, -alpha1 * b_h * rhos[-1]
