# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # The diffusion story: from Brownian motion to the probability-flow ODE
#
# A score-based diffusion model destroys data with noise along a forward SDE and learns to run
# that process backwards. This notebook walks through every piece with `sde_diffusion` on a 2-D
# Gaussian mixture, whose every marginal density, score and denoiser is known in closed form:
#
# 1. Brownian motion, the noise that drives everything;
# 2. the forward SDE $\mathrm{d}x = f(x, t)\,\mathrm{d}t + L(x, t)\,\mathrm{d}w$, diffusing the data to $\mathcal N(0, I)$;
# 3. its discretisation, the DDPM Markov chain of $T = 1000$ Gaussian kernels;
# 4. the *reverse* kernels of that chain: nearly Gaussian for small steps, not for large ones;
# 5. the learned reverse chain (DDPM ancestral sampling);
# 6. its continuous limit: the reverse SDE and the probability-flow (PF) ODE.
#
# `FAST = 1` (the test suite) shrinks every sample count and trains the network for a few hundred
# steps only; run with `SDE_DIFFUSION_FAST=0` (the default) for the full figures (about a minute on
# two CPU cores).

# %%
import os

FAST = os.environ.get("SDE_DIFFUSION_FAST", "0") == "1"

from functools import partial

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from matplotlib.lines import Line2D

import sde_diffusion as sd

N = 500 if FAST else 4000  # samples per scatter plot / statistic
keys = (jax.random.fold_in(jax.random.key(0), i) for i in range(1000))  # next(keys): a fresh key
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})

# %% [markdown]
# ## 1. Brownian motion
#
# A Brownian motion (Wiener process) $w(t)$ starts at $w(0) = 0$ and has independent Gaussian
# increments $w(t + h) - w(t) \sim \mathcal N(0, h I)$. Its paths are continuous but nowhere
# differentiable: over a step $h$ they move by $O(\sqrt h)$, not $O(h)$, and $\operatorname{Var} w(t) = t$.
# Paths on a grid are cumulative sums of independent increments $\sqrt{\Delta t}\,\varepsilon_k$,
# $\varepsilon_k \sim \mathcal N(0, I)$: exactly what an SDE solver draws at every step.

# %%
ts = np.linspace(0.0, 1.0, 501)
increments = np.sqrt(np.diff(ts))[:, None, None] * np.asarray(jax.random.normal(next(keys), (len(ts) - 1, N, 2)))
w = np.concatenate([np.zeros((1, N, 2)), np.cumsum(increments, axis=0)])  # (len(ts), N, 2)

fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for k in range(12):
    axes[0].plot(ts, w[:, k, 0], lw=0.8)
axes[0].fill_between(ts, -2 * np.sqrt(ts), 2 * np.sqrt(ts), color="grey", alpha=0.2, label=r"$\pm 2\sqrt{t}$")
axes[0].set(title="Brownian paths (first coordinate)", xlabel="t", ylabel="$w_1(t)$")
axes[0].legend(loc="upper left")
for k in range(5):
    axes[1].plot(w[:, k, 0], w[:, k, 1], lw=0.8, label=f"path {k + 1}")
    axes[1].scatter(w[-1, k, 0], w[-1, k, 1], s=15, color="k", zorder=3)
axes[1].set(title="2-D Brownian paths to t = 1 (• = end)", xlabel="$w_1$", ylabel="$w_2$", aspect="equal")
axes[1].legend(fontsize=8)
axes[2].plot(ts, w.var(axis=1).mean(axis=1), label=f"sample variance ({N} paths)")
axes[2].plot(ts, ts, "k--", label="Var w(t) = t")
axes[2].set(title="variance grows linearly in time", xlabel="t", ylabel="variance per coordinate")
axes[2].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The forward SDE
#
# The forward process adds a drift and scales the noise:
# $$\mathrm{d}x = f(x, t)\,\mathrm{d}t + L(x, t)\,\mathrm{d}w, \qquad t \in [0, 1],$$
# with data $x(0) \sim p_0$. We use the variance-preserving (VP) SDE of Song et al. (2021),
# $f = -\tfrac12 \beta(t)\,x$ and $L = \sqrt{\beta(t)}$ with $\beta$ linear from 0.1 to 20.
# Being linear, it has Gaussian transition kernels,
# $$x_t \mid x_0 \sim \mathcal N\big(\alpha(t)\,x_0,\ \sigma(t)^2 I\big), \qquad
#   \alpha(t) = e^{-\frac12\int_0^t \beta}, \quad \sigma^2 = 1 - \alpha^2,$$
# so $p_t$ is $p_0$ shrunk by $\alpha$ and blurred by $\sigma$, and $p_1 \approx \mathcal N(0, I)$.
# The signal-to-noise ratio $\lambda(t) = \log(\alpha^2/\sigma^2)$ (log-SNR) falls monotonically.
# `sd.VP()` gives all of these, and $f$ and $g^2 = \beta$ follow from $\alpha$, $\sigma$ by autodiff.

# %%
vp = sd.VP()
t_grid = np.linspace(0.0, 1.0, 400)
schedule = jax.jit(jax.vmap(lambda t: (vp.alpha(t), vp.sigma(t), vp.g2(t), vp.log_snr(t))))
alpha, sigma, g2, log_snr = map(np.asarray, schedule(t_grid))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
axes[0].plot(t_grid, alpha, label=r"$\alpha(t)$ (signal scale)")
axes[0].plot(t_grid, sigma, label=r"$\sigma(t)$ (noise scale)")
axes[0].plot(t_grid, g2 / 20, label=r"$g^2(t) = \beta(t)$, divided by 20")
axes[0].set(title="VP schedule", xlabel="t", ylabel="value")
axes[0].legend()
axes[1].plot(t_grid[1:], log_snr[1:], color="C3", label=r"$\lambda(t) = \log(\alpha^2/\sigma^2)$")
axes[1].set(title="log signal-to-noise ratio", xlabel="t", ylabel=r"$\lambda$")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The data: an 8-component Gaussian mixture on a ring (`sd.gaussian_mixture_oracle()`). Under any
# linear SDE each component stays Gaussian, so
# $p_t = \sum_k \pi_k\, \mathcal N(\alpha \mu_k,\ \alpha^2 C_k + \sigma^2 I)$ exactly; its contours
# are drawn over particles pushed forward by `sd.simulate`, frame by frame.

# %%
data = sd.gaussian_mixture_oracle()
pool = np.asarray(data.sample(next(keys), 20000 + 3 * N))  # exact samples, split below
x0, reference, other, train_data = np.split(pool, [N, 2 * N, 3 * N])
frames = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 1.0])
xt = np.asarray(sd.simulate(vp, x0, next(keys), frames))

lim = 3.2
grid = jnp.linspace(-lim, lim, 120)
gx, gy = jnp.meshgrid(grid, grid)
points = jnp.stack([gx.ravel(), gy.ravel()], axis=-1)
density = jax.jit(jax.vmap(jax.vmap(lambda t, x: jnp.exp(data.marginal_log_prob(vp, t, x)), (None, 0)), (0, None)))
dens = np.asarray(density(frames, points)).reshape(len(frames), *gx.shape)

fig, axes = plt.subplots(1, len(frames), figsize=(3.1 * len(frames), 3.4), sharey=True)
for ax, t, x, d in zip(axes, frames, xt, dens):
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="C0")
    ax.contour(gx, gy, d, levels=d.max() * np.array([0.05, 0.25, 0.5, 0.75]), colors="C3", linewidths=0.8)
    ax.set(title=f"t = {float(t):.2f}: α = {float(vp.alpha(t)):.2f}, σ = {float(vp.sigma(t)):.2f}",
           xlabel="$x_1$", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
axes[0].set_ylabel("$x_2$")
axes[0].legend(handles=[Line2D([], [], ls="", marker=".", color="C0", label="particles (sd.simulate)"),
                        Line2D([], [], color="C3", label="exact $p_t$ contours")], loc="lower left", fontsize=7)
fig.suptitle("the data diffused forward by the VP SDE, to N(0, I)")
fig.tight_layout()
plt.show()
print(f"at t = 1: sample mean {xt[-1].mean(0).round(3)}, sample covariance\n{np.cov(xt[-1].T).round(3)}")

# %% [markdown]
# ## 3. The discrete chain: DDPM
#
# Ho et al. (2020) define the forward process as a Markov chain of $T$ Gaussian kernels
# $$q(x_i \mid x_{i-1}) = \mathcal N\big(\sqrt{1 - \beta_i}\, x_{i-1},\ \beta_i I\big), \qquad i = 1, \dots, T,$$
# whose composition is again Gaussian: $q(x_i \mid x_0) = \mathcal N(\sqrt{\bar\alpha_i}\, x_0, (1 - \bar\alpha_i) I)$
# with $\bar\alpha_i = \prod_{j \le i} (1 - \beta_j)$. One step is an Euler–Maruyama step of the VP SDE
# with $\Delta t = 1/T$ and $\beta_i = \beta(t_i)\,\Delta t$:
# $\sqrt{1 - \beta_i} \approx 1 - \tfrac12 \beta(t)\Delta t$ is the drift, $\sqrt{\beta_i}\,\varepsilon = \sqrt{\beta(t)}\,\Delta w$
# the noise. So $\bar\alpha_i \to \alpha(i/T)^2$ as $T \to \infty$, with an $O(1/T)$ error:
# `sd.DDPM.from_vp(vp, T)` builds the matching chain.

# %%
chain = sd.DDPM.from_vp(vp, T=1000)
states = np.asarray(chain.sample_chain(next(keys), x0, store_every=50))  # x_0, x_50, ..., x_1000
i_all = jnp.arange(chain.num_steps + 1)
alpha_bar = chain.alpha_bar(i_all)


@partial(jax.jit, static_argnums=0)
def max_error(T):
    c, i = sd.DDPM.from_vp(vp, T), jnp.arange(T + 1)
    return jnp.max(jnp.abs(c.alpha_bar(i) - vp.alpha(i / T) ** 2))


Ts = [30, 100, 300, 1000, 3000, 10000]
errors = [float(max_error(T)) for T in Ts]

# the exact density of the first coordinate: a 1-D mixture, diffused by the same SDE
data_1d = sd.GaussianMixture(data.weights, data.means[:, :1], data.variances[:, :1])
density_1d = jax.jit(jax.vmap(jax.vmap(lambda t, x: jnp.exp(data_1d.marginal_log_prob(vp, t, x[None])),
                                        (None, 0)), (0, None)))  # over times (rows) and points x_1
x_line = jnp.linspace(-lim, lim, 200)

fig, axes = plt.subplots(1, 3, figsize=(15, 4))
axes[0].plot(i_all / 1000, alpha_bar, lw=3, alpha=0.5, label=r"chain $\bar\alpha_i$, T = 1000")
axes[0].plot(t_grid, alpha**2, "k--", label=r"SDE $\alpha(t)^2$")
axes[0].set(title="chain and SDE kernels agree", xlabel="t = i / T", ylabel="signal variance")
axes[0].legend()
axes[1].loglog(Ts, errors, "o-", label=r"$\max_i |\bar\alpha_i - \alpha(i/T)^2|$")
axes[1].loglog(Ts, 0.5 * errors[0] * Ts[0] / np.array(Ts), "k:", label="slope −1")
axes[1].set(title="the chain converges to the SDE as O(1/T)", xlabel="number of steps T", ylabel="max error")
axes[1].legend()
for j, i in enumerate([0, 50, 250]):
    axes[2].hist(states[i // 50, :, 0], bins=60, range=(-lim, lim), density=True, color=f"C{j}", alpha=0.35,
                 label=f"chain $x_{{{i}}}$")
    axes[2].plot(x_line, density_1d(jnp.array([i / 1000]), x_line)[0], color=f"C{j}", label=f"SDE $p_t$, t = {i / 1000:g}")
axes[2].set(title="chain marginals against the SDE's (first coordinate)", xlabel="$x_1$", ylabel="density")
axes[2].legend(fontsize=7, loc="upper left")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The reverse kernels
#
# To generate we need the reverse kernels $q(x_{i-1} \mid x_i)$. By Bayes,
# $$q(x_{i-1} \mid x_i) \propto p_{i-1}(x_{i-1})\ \mathcal N\big(x_i;\ \sqrt{1-\beta_i}\,x_{i-1},\ \beta_i I\big),$$
# and for our mixture $p_{i-1} = \sum_k \pi_k \mathcal N(m_k, S_k)$ (with $m_k = \sqrt{\bar\alpha_{i-1}}\mu_k$,
# $S_k = \bar\alpha_{i-1} C_k + (1 - \bar\alpha_{i-1}) I$) it is again a Gaussian mixture: with $a = \sqrt{1 - \beta_i}$,
# $$q(x_{i-1} \mid x_i) = \sum_k r_k\, \mathcal N(\tilde m_k, \tilde S_k), \quad
#   \tilde S_k = (S_k^{-1} + \tfrac{a^2}{\beta_i} I)^{-1}, \quad
#   \tilde m_k = \tilde S_k \big(S_k^{-1} m_k + \tfrac{a}{\beta_i} x_i\big), \quad
#   r_k \propto \pi_k\, \mathcal N(x_i;\ a m_k,\ a^2 S_k + \beta_i I).$$
# For small $\beta_i$ the likelihood factor is a narrow Gaussian (width $\sqrt{\beta_i}$) over which
# $p_{i-1}$ is nearly log-linear, so the product is close to a Gaussian (Feller 1949; Sohl-Dickstein
# et al. 2015): this is why DDPM can model each reverse step by a Gaussian. For a large step the
# likelihood is wide and the kernel inherits the modes of $p_{i-1}$. Below: the exact kernel (filled)
# against the Gaussian with the same mean and covariance (lines), at the same $p_{i-1}$ (a lightly
# noised ring, $\bar\alpha_{i-1} = 0.98$) and $x_i = \sqrt{1 - \beta_i}\,\bar x$ with $\bar x$ halfway
# between two modes.
#
# The divergences between the two are tiny for small steps, so this cell computes in float64
# (`jax.enable_x64`); the rest of the notebook runs in float32.

# %%
def chain_marginal(alpha_bar_prev):
    """p_{i-1}: the data mixture pushed through q(x_{i-1} | x_0) (in the default float dtype)."""
    weights, means, variances = (jnp.asarray(a, float) for a in (data.weights, data.means, data.variances))
    return sd.GaussianMixture(weights, jnp.sqrt(alpha_bar_prev) * means, alpha_bar_prev * variances + (1 - alpha_bar_prev))


def reverse_kernel(alpha_bar_prev, beta, x):
    """The exact q(x_{i-1} | x_i = x) as a Gaussian mixture (diagonal components)."""
    prev = chain_marginal(alpha_bar_prev)
    a = jnp.sqrt(1 - beta)
    s, m = prev.variances, prev.means  # (K, 2) each
    post_var = 1 / (1 / s + a**2 / beta)
    post_mean = post_var * (m / s + a * x / beta)
    evidence_var = a**2 * s + beta
    log_r = jnp.log(prev.weights) - 0.5 * jnp.sum((x - a * m) ** 2 / evidence_var + jnp.log(evidence_var), axis=-1)
    return sd.GaussianMixture(jnp.exp(log_r - jnp.max(log_r)), post_mean, post_var)


def moment_matched(kernel):
    """The Gaussian with the kernel's mean and covariance."""
    return sd.MultivariateNormal(kernel.mean(), kernel.covariance())


def kernel_grid(kernel, n=150, width=5.0):
    """A square grid around the kernel mean, ``width`` standard deviations in each direction."""
    half = width * jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(kernel.covariance())))
    u = jnp.linspace(-half, half, n)
    gx, gy = jnp.meshgrid(u + kernel.mean()[0], u + kernel.mean()[1])
    return gx, gy, (u[1] - u[0]) ** 2


@jax.jit
def densities_and_kl(alpha_bar_prev, beta, x):
    """Exact and Gaussian densities on the kernel's grid, and KL(exact || Gaussian) by quadrature."""
    kernel = reverse_kernel(alpha_bar_prev, beta, x)
    gx, gy, cell = kernel_grid(kernel)
    pts = jnp.stack([gx.ravel(), gy.ravel()], axis=-1)
    log_p = jax.vmap(kernel.log_prob)(pts).reshape(gx.shape)
    log_q = jax.vmap(moment_matched(kernel).log_prob)(pts).reshape(gx.shape)
    p = jnp.exp(log_p)
    return gx, gy, p, jnp.exp(log_q), jnp.sum(p * (log_p - log_q)) * cell


alpha_bar_prev = 0.98
i_small = int(jnp.argmin(jnp.abs(alpha_bar - alpha_bar_prev))) + 1  # the T = 1000 chain's step there
beta_small, beta_large = float(chain.betas[i_small - 1]), 0.5
x_query = 0.5 * (data.means[0] + data.means[1])  # between two modes
betas = np.geomspace(1e-4, 0.9, 8 if FAST else 25)
with jax.enable_x64(True):
    panels = [densities_and_kl(alpha_bar_prev, b, jnp.sqrt(1 - b) * jnp.asarray(x_query, float))
              for b in (beta_small, beta_large)]
    # KL averaged over x_i ~ p_i: x_{i-1} ~ p_{i-1}, then one forward step
    eps = np.random.default_rng(0).standard_normal((2, 4 if FAST else 16, 2))
    x_prev = np.sqrt(alpha_bar_prev) * x0[: eps.shape[1]] + np.sqrt(1 - alpha_bar_prev) * eps[0]

    @jax.jit
    def mean_kl(beta):
        x_i = jnp.sqrt(1 - beta) * x_prev + jnp.sqrt(beta) * eps[1]
        return jnp.mean(jax.vmap(lambda x: densities_and_kl(alpha_bar_prev, beta, x)[-1])(x_i))

    kls = np.array([mean_kl(b) for b in betas])
    panels = jax.tree.map(np.asarray, panels)
modes = np.sqrt(alpha_bar_prev) * np.asarray(data.means)

fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
for ax, beta, (gx, gy, p, q, kl), name in zip(axes, (beta_small, beta_large), panels,
                                              (f"small step: T = 1000 chain, i = {i_small}", "large step")):
    ax.contourf(gx, gy, p, levels=12, cmap="Blues")
    ax.contour(gx, gy, q, levels=6, colors="C3", linewidths=1.0)
    ax.scatter(*modes.T, marker="x", color="k", s=30)
    ax.scatter(*(np.sqrt(1 - beta) * np.asarray(x_query)), marker="*", color="C1", s=120, zorder=3)
    ax.set(title=f"{name}: β = {beta:.4f}\nKL(exact ‖ Gaussian) = {float(kl):.2e}",
           xlabel="$x_{i-1,1}$", ylabel="$x_{i-1,2}$", aspect="equal",
           xlim=(gx.min(), gx.max()), ylim=(gy.min(), gy.max()))
    ax.legend(handles=[Line2D([], [], color="C0", lw=6, alpha=0.6, label="exact $q(x_{i-1} | x_i)$"),
                       Line2D([], [], color="C3", label="Gaussian, same mean/cov."),
                       Line2D([], [], ls="", marker="x", color="k", label="modes of $p_{i-1}$"),
                       Line2D([], [], ls="", marker="*", color="C1", ms=10, label="$x_i$")],
              loc="lower left", fontsize=7)
axes[2].loglog(betas, kls, "o-", label=r"exact vs Gaussian, mean over $x_i \sim p_i$")
axes[2].loglog(betas, kls[0] * (betas / betas[0]) ** 3, "k:", label=r"$\propto \beta^3$")
axes[2].axvline(beta_small, color="C2", ls="--", label="small step (left)")
axes[2].axvline(beta_large, color="C1", ls="--", label="large step (middle)")
axes[2].set(title="how far the reverse kernel is from Gaussian", xlabel=r"step size $\beta_i$",
            ylabel="KL(exact ‖ Gaussian) [nats]")
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The KL divergence between the exact reverse kernel and its best Gaussian fit falls like $\beta^3$ for
# small steps: the kernel has width $\sqrt\beta$, its leading non-Gaussian term is the skewness
# $\propto \nabla^3 \log p_{i-1} \cdot \beta^{3/2}$, and the KL is quadratic in it. With $T = 1000$ small
# steps a Gaussian reverse kernel loses almost nothing, while a handful of large steps would need a
# multimodal one. (This is the argument of DDPM; continuous time makes it exact.)
#
# ## 5. The learned reverse chain: DDPM ancestral sampling
#
# The Gaussian reverse kernel needs only a mean, and Bayes' rule on the *forward* kernels gives it
# once $x_0$ is known:
# $q(x_{i-1} \mid x_i, x_0) = \mathcal N(\tilde\mu_i(x_i, x_0), \tilde\beta_i I)$ with
# $\tilde\mu_i = \frac{\sqrt{\bar\alpha_{i-1}}\beta_i}{1 - \bar\alpha_i} x_0 + \frac{\sqrt{1-\beta_i}(1 - \bar\alpha_{i-1})}{1 - \bar\alpha_i} x_i$
# and $\tilde\beta_i = \frac{1 - \bar\alpha_{i-1}}{1 - \bar\alpha_i}\beta_i$ (`chain.posterior`).
# Ancestral sampling plugs in a network's guess of the clean data, the denoiser
# $D_\theta(x_i) \approx \mathbb E[x_0 \mid x_i]$, and walks from $x_T \sim \mathcal N(0, I)$ down to $x_0$.
# (With the exact denoiser, $\tilde\mu_i(x_i, \mathbb E[x_0 \mid x_i])$ is the exact mean of $q(x_{i-1} \mid x_i)$.)
#
# We train a small MLP on samples of the mixture by denoising score matching (EDM preconditioning
# and weighting, see `02_training_2d`), and compare with the exact denoiser of the mixture.

# %%
sigma_data = float(train_data.std())
net = sd.MLP(2, hidden=128, depth=3, rngs=nnx.Rngs(0))
model = sd.EDMPreconditioned(sd.Network(net, vp), sigma_data=sigma_data)
objective = sd.DenoisingScoreMatching(weighting=sd.EDMWeighting(sigma_data=sigma_data), times=sd.LogNormalNoise())
config = sd.TrainConfig(steps=300 if FAST else 4000, batch_size=256, learning_rate=2e-3, warmup_steps=100)
result = sd.train(model, objective, vp, train_data, config, progress=False)
model = result.ema_model
print(f"trained {result.step} steps, final loss {result.history[-1]['loss']:.3f}")
exact = sd.Denoiser(partial(data.denoiser, vp))  # the oracle: E[x0 | x_t] in closed form


@eqx.filter_jit
def ancestral(model, x_T, key):
    """DDPM ancestral sampling on ``chain``: all states x_T, ..., x_0, shape (T + 1, n, 2)."""

    def step(x, i_key):
        i, k = i_key
        ab = chain.alpha_bar(i)
        # the VP time with the chain's noise level at step i (≈ i/T)
        t = jnp.clip(vp.t_from_log_snr(jnp.log(ab) - jnp.log1p(-ab)), vp.t0, vp.t1)
        x0_hat = jax.vmap(model.denoiser, in_axes=(None, None, 0))(vp, t, x)
        posterior = chain.posterior(i, x, x0_hat)  # N(μ̃, β̃ I)
        x = posterior.loc + posterior.scale * jax.random.normal(k, x.shape)
        return x, x

    steps = jnp.arange(chain.num_steps, 0, -1)
    _, xs = jax.lax.scan(step, x_T, (steps, jax.random.split(key, chain.num_steps)))
    return jnp.concatenate([x_T[None], xs])


x_T = jax.random.normal(next(keys), (N, 2))
chain_learned = np.asarray(ancestral(model, x_T, next(keys)))
chain_exact = np.asarray(ancestral(exact, x_T, next(keys)))

sw_key = next(keys)


@jax.jit
def scores(x):
    return sd.sliced_wasserstein(x, reference, sw_key), jnp.mean(jax.vmap(data.log_prob)(x))


def quality(x):
    """Sliced W2 to fresh data, and the mean exact log-density of the data distribution at x."""
    sw2, log_p = scores(x)
    return f"SW2 {float(sw2):.3f}, E log p₀ {float(log_p):.2f}"


print("fresh data against fresh data (the floor):", quality(other))

show = [1000, 600, 400, 250, 150, 80, 0]
fig, axes = plt.subplots(2, len(show), figsize=(2.8 * len(show), 6.8), sharex=True, sharey=True)
for row, (states, name) in enumerate(((chain_learned, "learned D_θ"), (chain_exact, "exact D"))):
    for ax, i in zip(axes[row], show):
        x = states[chain.num_steps - i]
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color=f"C{row}", label=name)
        ax.set(title=f"$x_{{{i}}}$" + (f"\n{quality(x)}" if i == 0 else ""), aspect="equal",
               xlim=(-lim, lim), ylim=(-lim, lim))
    axes[row, 0].set_ylabel("$x_2$")
    axes[row, 0].legend(markerscale=8, loc="lower left", fontsize=8)
for ax in axes[1]:
    ax.set_xlabel("$x_1$")
fig.suptitle(f"DDPM ancestral sampling, T = 1000; fresh data: {quality(other)}")
fig.tight_layout()
plt.show()

# %% [markdown]
# Even with the exact denoiser the chain is not exact: by the law of total variance the true reverse
# kernel has covariance $\tilde\beta_i I + c_i^2 \operatorname{Cov}[x_0 \mid x_i]$ ($c_i$ the coefficient of $x_0$ in
# $\tilde\mu_i$), more than the $\tilde\beta_i I$ used here, so the samples come out slightly too concentrated (a
# higher mean log-density than fresh data). Ho et al. (2020) use either $\tilde\beta_i$ or $\beta_i$, the
# two extreme cases; the error vanishes as $T \to \infty$.
#
# ## 6. The continuous limit: reverse SDE and probability-flow ODE
#
# As $T \to \infty$ the reverse chain becomes the reverse-time SDE (Anderson 1982)
# $$\mathrm{d}x = \big[f(x, t) - \nabla\!\cdot\! (LL^\top) - LL^\top \nabla_x \log p_t(x)\big]\,\mathrm{d}t + L\,\mathrm{d}\bar w,$$
# run from $t = 1$ down to $0$ ($\bar w$ a Brownian motion in reversed time; the divergence term vanishes
# when $L$ does not depend on $x$). Its marginals are the same $p_t$ as the forward SDE's. So are
# those of the deterministic **probability-flow ODE**
# $$\frac{\mathrm{d}x}{\mathrm{d}t} = f(x, t) - \tfrac12 \nabla\!\cdot\!(LL^\top) - \tfrac12 LL^\top \nabla_x \log p_t(x),$$
# which moves each point along the flow that transports $p_1$ to $p_0$ (Song et al. 2021). Both need
# only the score $\nabla \log p_t = (\alpha D - x)/\sigma^2$, which the trained denoiser gives.
# `sd.ReverseSDE` and `sd.ProbabilityFlowODE` build them in reversed time $s = 1 - t$, so any
# solver integrates forward; we stop at $\sigma/\alpha = 0.002$ and denoise once (the score blows up
# as $\sigma \to 0$).
#
# Below, the first coordinate of a few paths of each sampler over the exact density $p_t(x_1)$: the
# chain and the reverse SDE jitter like Brownian motion, the PF ODE glides.

# %%
score = lambda t, x: model.score(vp, t, x)
t_min = float(vp.t_from_log_snr(-2 * np.log(0.002)))
s_save = jnp.linspace(0.0, 1.0 - t_min, 201)  # reversed time s = 1 - t
sde_paths = sd.simulate(sd.ReverseSDE(vp, score), x_T, next(keys), s_save)

flow = sd.ProbabilityFlowODE(vp, score)
ode = diffrax.diffeqsolve(
    diffrax.ODETerm(lambda s, x, args: jax.vmap(flow.vector_field, in_axes=(None, 0))(s, x)),
    diffrax.Tsit5(), 0.0, 1.0 - t_min, 0.01, x_T,
    saveat=diffrax.SaveAt(ts=s_save),
    stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5),
)
ode_paths = ode.ys
denoise = jax.jit(lambda t, x: jax.vmap(model.denoiser, in_axes=(None, None, 0))(vp, t, x))
samples = {
    "DDPM ancestral (T = 1000)": chain_learned[-1],
    "reverse SDE (Euler–Maruyama, 1000 steps)": np.asarray(denoise(t_min, sde_paths[-1])),
    f"PF ODE (Tsit5, {int(ode.stats['num_steps'])} adaptive steps)": np.asarray(denoise(t_min, ode_paths[-1])),
}

img = np.asarray(density_1d(jnp.linspace(0.0, 1.0, 200), x_line))  # exact p_t(x_1) over (t, x_1)
img = img / img.max(axis=1, keepdims=True)  # each time slice scaled to its maximum
path_sets = [
    (chain.time(jnp.arange(chain.num_steps, -1, -1)), chain_learned),
    (1.0 - s_save, np.asarray(sde_paths)),
    (1.0 - s_save, np.asarray(ode_paths)),
]
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), sharey=True)
for ax, (name, x), (tp, paths) in zip(axes, samples.items(), path_sets):
    ax.imshow(img.T, origin="lower", aspect="auto", extent=(0, 1, -lim, lim), cmap="Greys", vmax=1.5)
    for k in range(8):
        ax.plot(tp, paths[:, k, 0], lw=0.8)
    ax.set(title=name, xlabel="t (generation runs right to left)", xlim=(1, 0), ylim=(-lim, lim))
    ax.legend(handles=[Line2D([], [], color="grey", lw=6, label="exact $p_t(x_1)$ / its max at t"),
                       Line2D([], [], color="C0", label="sample paths")], loc="lower right", fontsize=8)
axes[0].set_ylabel("$x_1$")
fig.tight_layout()
plt.show()

fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), sharex=True, sharey=True)
axes[0].scatter(*other.T, s=1, alpha=0.4, color="k", label="data")
axes[0].set(title=f"fresh data\n{quality(other)}")
for j, (ax, (name, x)) in enumerate(zip(axes[1:], samples.items())):
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color=f"C{j}", label="samples")
    ax.set(title=f"{name}\n{quality(x)}")
for ax in axes:
    ax.set(xlabel="$x_1$", aspect="equal", xlim=(-2, 2), ylim=(-2, 2))
    ax.legend(markerscale=8, loc="lower left", fontsize=8)
axes[0].set_ylabel("$x_2$")
fig.tight_layout()
plt.show()

# %% [markdown]
# Three samplers, one learned score: the discrete chain, its SDE limit and the deterministic flow all
# land on the ring (the SW2 and the mean log-density of the data distribution at the samples are
# compared with those of fresh data in the titles). The PF ODE needs far fewer model evaluations with an
# adaptive solver (Tsit5 makes six per step: a few hundred in all, against 1000 for the other two) and
# maps each noise point to one data point, which is what makes exact likelihoods (`05_likelihood`) and
# fast high-order solvers (`03_solver_benchmark`) possible. In fast mode the network has trained for a
# few hundred steps only: its samples are still blurred.
