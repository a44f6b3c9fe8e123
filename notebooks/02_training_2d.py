# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Training on 2-D data: parametrizations and weightings
#
# Every model here is trained by denoising score matching (DSM, Vincent 2011) under the VP SDE,
# $x_t = \alpha(t)\,x_0 + \sigma(t)\,\varepsilon$:
# $$\mathcal L(\theta) = \mathbb E_{t}\, \mathbb E_{x_0, \varepsilon}\Big[\, w(t)\,\lambda(t)\,
#   \big\| s_\theta(x_t, t) + \varepsilon/\sigma(t) \big\|^2 \Big],$$
# since $-\varepsilon/\sigma = \nabla \log p(x_t \mid x_0)$, and the minimiser is the score $\nabla \log p_t$.
# Two choices remain, and this notebook compares both on the two-moons data set (samples, sliced
# Wasserstein distance, loss curves) and on a Gaussian mixture, whose exact score tells us *where* in
# noise level each model is wrong:
#
# * the **parametrization**: what the network outputs, and how it becomes a score;
# * the **weighting** $\lambda(t)$ of the squared score error over noise levels, with the
#   distribution of training times $t$ (and its importance weight $w$).
#
# `FAST = 1` (the test suite) trains for a few hundred steps only, so its figures show barely trained
# models; `SDE_DIFFUSION_FAST=0` (the default) trains for a few thousand steps (a few minutes on two CPU cores).

# %%
import os

FAST = os.environ.get("SDE_DIFFUSION_FAST", "0") == "1"

import shutil
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import sde_diffusion as sd

STEPS = 100 if FAST else 2000  # training steps
N = 1000 if FAST else 4000  # samples drawn and held-out points
plt.rcParams.update({"figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
vp = sd.VP()

# %% [markdown]
# ## Parametrizations
#
# With $x = \alpha x_0 + \sigma\varepsilon$ every prediction fixes the others: the score
# $s = -\hat\varepsilon/\sigma = (\alpha D - x)/\sigma^2$, where $D(x, t) = \mathbb E[x_0 \mid x_t = x]$ is
# the denoiser. The network $F_\theta(x, c_\text{noise})$ (an MLP that sees $c_\text{noise} = \frac14\log(\sigma/\alpha)$) can predict
#
# | `sd.` | network predicts | score |
# |---|---|---|
# | `Noise` | $\hat\varepsilon = F_\theta$ | $-F_\theta/\sigma$ |
# | `Denoiser` | $\hat x_0 = F_\theta$ | $(\alpha F_\theta - x)/\sigma^2$ |
# | `Velocity` | $\hat v = F_\theta$, $v = \dot\alpha x_0 + \dot\sigma\varepsilon$ | via $D = (\dot\sigma x - \sigma \hat v)/(\alpha\dot\sigma - \sigma\dot\alpha)$ |
# | `EDMPreconditioned` | $D = c_\text{skip}\hat x + c_\text{out} F_\theta(c_\text{in}\hat x)$ | via $D$ |
#
# where EDM (Karras et al. 2022) works on $\hat x = x/\alpha$ at noise level $\tilde\sigma = \sigma/\alpha$ with
# $c_\text{skip} = \sigma_d^2/(\tilde\sigma^2 + \sigma_d^2)$, $c_\text{out} = \tilde\sigma\sigma_d/\sqrt{\tilde\sigma^2 + \sigma_d^2}$,
# $c_\text{in} = 1/\sqrt{\tilde\sigma^2 + \sigma_d^2}$, so that the network's input and target both have unit
# variance at every noise level ($\sigma_d$ is the data's standard deviation).
#
# The *objective* does not depend on the parametrization: $\|s_\theta - s\|^2 = \|\hat\varepsilon - \varepsilon\|^2/\sigma^2
# = (\alpha^2/\sigma^4)\|\hat x_0 - x_0\|^2$. But the scale of the network's error does: under the same
# objective an error of the raw output is amplified by $1/\sigma$ for $\hat\varepsilon$ and by $\alpha/\sigma^2$ for
# $\hat x_0$, so the optimiser sees very different problems.
#
# ## Weightings and training times
#
# | `sd.` | $\lambda(t)$ on $\|s_\theta - s\|^2$ | in words |
# |---|---|---|
# | `NoiseWeighting` | $\sigma^2$ | "simple" loss of DDPM: $\|\hat\varepsilon - \varepsilon\|^2$ |
# | `LikelihoodWeighting` | $g^2$ | bounds $-\log p_\theta(x_0)$ (Song et al. 2021) |
# | `EDMWeighting` | $\sigma^2(\tilde\sigma^2 + \sigma_d^2)/\sigma_d^2$ | unit-variance loss of the preconditioned net |
# | `MinSNRWeighting` | $\sigma^2\min(1, \gamma/\text{SNR})$ | min-SNR-$\gamma$ (Hang et al. 2023): $\min(\text{SNR}, \gamma)\|\hat x_0 - x_0\|^2$ |
#
# and times are drawn uniformly in $t$ (`UniformTimes`), uniformly in log-SNR (`LogSNRTimes`, with the
# importance weight $w \propto \sigma^2/g^2$ that keeps the objective unchanged; with $g^2$ the product
# $w g^2 \propto \sigma^2$ tames the variance of the regression target $\varepsilon/\sigma$, huge near $t = 0$), or
# log-normally in $\tilde\sigma$ (`LogNormalNoise`, EDM's choice).
#
# We train seven models: the four parametrizations under the DDPM loss ($\sigma^2$, uniform $t$), and the
# EDM-preconditioned network under the four weightings (the $\sigma^2$ run is shared). All start from the
# same initial weights and see the same data batches.

# %%
net = sd.Network(sd.MLP(2, hidden=128, depth=3, rngs=nnx.Rngs(0)), vp)  # the same initial weights for all


def make_runs(sigma_data):
    """name -> (model, objective): four parametrizations, then four weightings."""
    simple = sd.DenoisingScoreMatching(weighting=sd.NoiseWeighting(), times=sd.UniformTimes())
    edm = sd.EDMPreconditioned(net, sigma_data=sigma_data)
    return {
        "ε-prediction": (sd.Noise(net), simple),
        "x₀-prediction": (sd.Denoiser(net), simple),
        "v-prediction": (sd.Velocity(net), simple),
        "EDM, σ² weighting": (edm, simple),
        "EDM, likelihood g²": (edm, sd.DenoisingScoreMatching(weighting=sd.LikelihoodWeighting(), times=sd.LogSNRTimes())),
        "EDM, EDM weighting": (edm, sd.DenoisingScoreMatching(weighting=sd.EDMWeighting(sigma_data),
                                                              times=sd.LogNormalNoise())),
        "EDM, min-SNR-5": (edm, sd.DenoisingScoreMatching(weighting=sd.MinSNRWeighting(gamma=5.0), times=sd.UniformTimes())),
    }


data = sd.moons(20000, seed=0)
held_out = sd.moons(2 * N, seed=1)
runs = make_runs(float(data.std()))
names = list(runs)
groups = {"parametrizations (σ² weighting, uniform t)": names[:4], "weightings (EDM preconditioning)": names[3:]}

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.scatter(*data[:4000].T, s=1, alpha=0.4, label="training data (4000 of 20000)")
ax.set(title="two moons", xlabel="$x_1$", ylabel="$x_2$", aspect="equal")
ax.legend(markerscale=8, loc="lower left")
plt.show()

# %% [markdown]
# ## Training all seven at once
#
# `sd.train` trains any pytree of models holding `sd.Network`s on any objective
# `objective(model, sde, batch, key)` with any optax optimiser. A dict of the seven models with the
# *sum* of their objectives is trained by one compiled step (one compilation instead of seven): the
# parameters are disjoint, so each model receives exactly the gradient of its own loss, and the EMA of
# the weights acts per parameter. The one coupling would be gradient clipping, whose global norm would
# run over all seven models; `optax.multi_transform` gives each model its own copy of the trainer's
# default optimiser (clip the gradient norm to 1, then Adam with a linear warm-up), so every model is
# trained exactly as if alone. The trainer saves orbax checkpoints along the way; reloading them
# (`sd.restore_model`) gives a loss curve per model on held-out data, with the same draws of $t$ and
# $\varepsilon$ at every checkpoint.


# %%
def train_all(runs, data, steps, held_out=None, points=2 if FAST else 10):
    """Train every model of ``runs`` jointly; returns the EMA models and, given ``held_out`` data,
    the checkpoint steps and each model's loss on it there (its own objective, fixed draws)."""
    models = {name: model for name, (model, _) in runs.items()}

    def objective(models, sde, batch, key):
        return sum(runs[name][1](models[name], sde, batch, jax.random.fold_in(key, i)) for i, name in enumerate(models))

    every = steps // points
    config = sd.TrainConfig(steps=steps, batch_size=256, learning_rate=2e-3, warmup_steps=100,
                            checkpoint_every=every, keep_checkpoints=points, log_every=every)
    learning_rate = lambda n: config.learning_rate * jnp.minimum(1.0, (n + 1) / config.warmup_steps)
    alone = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(learning_rate))
    optimizer = optax.multi_transform({name: alone for name in runs},
                                      lambda params: {name: jax.tree.map(lambda _: name, params[name]) for name in params})
    if held_out is None:
        return sd.train(models, objective, vp, data, config, optimizer=optimizer, progress=not FAST).ema_model

    @eqx.filter_jit
    def held_out_losses(models, key):
        return {name: runs[name][1](model, vp, held_out, jax.random.fold_in(key, i))
                for i, (name, model) in enumerate(models.items())}

    directory = tempfile.mkdtemp(prefix="training_2d_")
    try:
        result = sd.train(models, objective, vp, data, config, optimizer=optimizer, checkpoint_dir=directory,
                          progress=not FAST)
        checkpoints = np.arange(0, steps + 1, every)
        losses = [held_out_losses(models, jax.random.key(1))] + [  # the initial models, then each checkpoint
            held_out_losses(sd.restore_model(models, directory, ema=False, step=int(k)), jax.random.key(1))
            for k in checkpoints[1:]]
    finally:
        shutil.rmtree(directory)
    return result.ema_model, checkpoints, {name: np.array([float(l[name]) for l in losses]) for name in runs}


trained, checkpoint_steps, curves = train_all(runs, data, STEPS, held_out=held_out[:N])

fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for name in groups["parametrizations (σ² weighting, uniform t)"]:
    axes[0].plot(checkpoint_steps, curves[name], "o-", ms=3, color=f"C{names.index(name)}", label=name)
axes[0].set(title="parametrizations: the same objective (σ² weighting, uniform t)", ylabel="held-out loss")
for name in groups["weightings (EDM preconditioning)"]:
    axes[1].plot(checkpoint_steps, curves[name] / curves[name][-1], "o-", ms=3, color=f"C{names.index(name)}",
                 label=f"{name} (final {curves[name][-1]:.3g})")
axes[1].set(title="weightings: four objectives, each relative to its final value", ylabel="held-out loss / final")
axes[0].set_yscale("log")
for ax in axes:
    ax.set_xlabel("training step")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The four parametrizations minimise the *same* objective, so their curves are directly comparable:
# they differ only in how easily the optimiser reaches the minimum. The weighted runs minimise
# different objectives, whose values cannot be compared with each other, only their convergence. Note
# how flat the curves become: a DSM loss is dominated by its irreducible part
# $\mathbb E[w\lambda(d/\sigma^2 - \|\nabla\log p_t\|^2)]$, so it says little about how good a model is.
#
# ## Samples
#
# We sample every model with DPM-Solver++(3M) on 19 log-SNR-uniform steps down to $\sigma/\alpha = 0.002$,
# then take one denoising step (20 model evaluations in all), and measure the sliced Wasserstein-2
# distance (SW2) to held-out data; two independent held-out sets give its noise floor. One compiled
# function samples all seven models.

# %%
t_end = float(vp.t_from_log_snr(-2 * np.log(0.002)))  # σ/α = 0.002: the score is singular at σ = 0


@eqx.filter_jit
def sample_all(models, key):
    samples = {}
    for name, model in models.items():
        x, _ = sd.sample(vp, model, key, (N, 2), method=sd.DPMSolverPP(19, order=3), t_end=t_end)
        samples[name] = jax.vmap(model.denoiser, in_axes=(None, None, 0))(vp, t_end, x)
    return samples


samples = jax.tree.map(np.asarray, sample_all(trained, jax.random.key(2)))
sliced_w2 = jax.jit(lambda x: sd.sliced_wasserstein(x, held_out[:N], jax.random.key(3)))
sw2 = {name: float(sliced_w2(x)) for name, x in samples.items()}
floor = float(sliced_w2(held_out[N:]))

fig, axes = plt.subplots(2, 5, figsize=(20, 7.5), sharex=True, sharey=True)
axes[0, 0].scatter(*held_out[:N].T, s=1, alpha=0.4, color="k", label="held-out data")
axes[0, 0].set(title=f"held-out data (SW2 floor {floor:.3f})")
panels = [axes[0, 1], axes[0, 2], axes[0, 3], axes[0, 4], axes[1, 1], axes[1, 2], axes[1, 3]]
for j, (ax, name) in enumerate(zip(panels, names)):
    x = samples[name]
    ax.scatter(*x.T, s=1, alpha=0.4, color=f"C{j}", label="samples")
    ax.set(title=f"{name}\nSW2 {sw2[name]:.3f}")
for ax in axes.flat:
    ax.set(xlim=(-2.8, 2.8), ylim=(-2, 2), aspect="equal")
    if ax.collections:
        ax.legend(markerscale=8, loc="lower left", fontsize=8)
for ax in axes[1]:
    ax.set_xlabel("$x_1$")
for ax in axes[:, 0]:
    ax.set_ylabel("$x_2$")
axes[1, 0].axis("off")
axes[1, 4].axis("off")
axes[1, 0].text(0.0, 0.5, "top row: parametrizations,\nDDPM loss (σ² weighting, uniform t)\n\n"
                "bottom row: weightings,\nEDM-preconditioned network\n(the σ² run is top right)",
                transform=axes[1, 0].transAxes, fontsize=11, va="center")
fig.suptitle(f"{STEPS} training steps, DPM-Solver++(3M), 20 model evaluations")
fig.tight_layout()
plt.show()
for name in names:
    print(f"{name:22s} SW2 {sw2[name]:.4f}   final held-out loss {curves[name][-1]:.4g}")
print(f"{'floor':22s} SW2 {floor:.4f}")

# %% [markdown]
# ## Where the score is wrong: the exact mixture
#
# On the 8-component Gaussian mixture (`sd.gaussian_mixture_oracle()`) the score of every marginal
# $p_t$ is known exactly, so we can measure a trained model's error at each noise level:
# $$e(\tilde\sigma) = \frac{\sigma^2}{d}\, \mathbb E_{x \sim p_t} \big\| s_\theta(x, t) - \nabla \log p_t(x) \big\|^2,$$
# the mean squared error in noise-prediction units ($\sigma s = -\varepsilon$), at $\tilde\sigma = \sigma/\alpha$
# from 0.002 (almost clean) to 150 (almost pure noise), with the same draws $x \sim p_t$ for every model.
# We train the same seven configurations on 20000 samples of the mixture.

# %%
oracle = sd.gaussian_mixture_oracle()
mixture_data = sd.gaussian_mixture(20000, seed=0)
mixture_models = train_all(make_runs(float(mixture_data.std())), mixture_data, STEPS)

log_snr = jnp.linspace(float(vp.log_snr(vp.t1)), -2 * np.log(0.002), 12 if FAST else 32)
ts = jax.vmap(vp.t_from_log_snr)(log_snr)
sigma_tilde = np.exp(-np.asarray(log_snr) / 2)


@eqx.filter_jit
def score_errors(models, key):
    keys = jax.random.split(key, ts.shape[0])

    def error(model, t, k):
        x = oracle.marginal_sample(vp, t, k, N)
        diff = jax.vmap(lambda y: model.score(vp, t, y) - oracle.marginal_score(vp, t, y))(x)
        return vp.sigma2(t) * jnp.mean(jnp.sum(diff**2, axis=-1)) / oracle.dim

    return {name: jax.vmap(lambda t, k: error(model, t, k))(ts, keys) for name, model in models.items()}


errors = jax.tree.map(np.asarray, score_errors(mixture_models, jax.random.key(4)))

fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
for ax, (group, members) in zip(axes, groups.items()):
    for name in members:
        ax.loglog(sigma_tilde, errors[name], "o-", ms=3, color=f"C{names.index(name)}",
                  label=f"{name} (mean {errors[name].mean():.3f})")
    ax.set(title=f"score error on the exact mixture: {group}", xlabel=r"noise level $\tilde\sigma = \sigma/\alpha$",
           ylabel=r"$\sigma^2\, \mathbb{E}\|s_\theta - \nabla\log p_t\|^2 / d$")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# What to read off (in full mode; fast mode has barely trained):
#
# * **All models are worst at $\tilde\sigma \approx 0.1$**, the noise level at which the eight components
#   (standard deviations 0.05 to 0.15, 0.77 apart) merge: there the score switches sharply between modes.
# * **x₀-prediction** under the DDPM loss is the clear loser. Its squared score error grows like $1/\tilde\sigma^2$
#   towards low noise (an error of $\hat x_0$ is multiplied by $\alpha/\sigma^2$ in the score), its moons are joined by a
#   bridge of samples, and its loss curve is the slowest and noisiest: the loss weight it sees on
#   $\|\hat x_0 - x_0\|^2$ is the SNR, which spans ten orders of magnitude. (It also needs the gradient
#   clipping: without it, its training was unstable in our trials, with loss spikes and a sliced W2 above 1.)
# * **ε-prediction** has a flat error at low noise (its output is the noise itself) but a floor at high noise;
#   **v-prediction** is the most accurate at low noise here; **EDM preconditioning** is by far the most
#   accurate at high noise, where the skip connection $c_\text{skip}\hat x$ carries the (nearly linear) answer
#   and the network only adds a small correction.
# * Among the weightings, the **likelihood weighting** $g^2$ with log-SNR-uniform times is ten times more accurate
#   than the others at the lowest noise levels, which govern likelihoods (`05_likelihood`): it spends as much
#   training on $\tilde\sigma \in [0.002, 0.02]$ as on any other decade. **EDM's** log-normal times, centred at
#   $\tilde\sigma = e^{-1.2} \approx 0.3$, give the lowest error around the hard noise level $\tilde\sigma \approx 0.1$.
#   **Min-SNR-5** lowers the weight of low noise, and is the least accurate there.
# * On the moons, every choice except x₀-prediction reaches a sliced W2 within about 0.02 of the noise floor,
#   and their order changes from run to run: SW2 on a few thousand 2-D samples cannot rank good models. The
#   exact score error can, which is what the mixture oracle is for.
