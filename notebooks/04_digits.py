# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # A U-Net on 8×8 digits
#
# The images of scikit-learn's digits data set (1797 handwritten digits, 8×8 pixels, 17 grey levels)
# are small enough to train an image diffusion model on a CPU in minutes. We train `sd.UNet` with EDM
# preconditioning under the VP SDE, sample it with DPM-Solver++, and score the samples with a Fréchet
# distance in the features of a small digits classifier (an FID for digits).
#
# **Fast mode** (`SDE_DIFFUSION_FAST=1`, the test suite) trains for a handful of steps only: its
# samples are noise, and its Fréchet distance is that of noise. Run with `SDE_DIFFUSION_FAST=0` (the
# default) for real digits (a few minutes on two CPU cores).

# %%
import os

FAST = os.environ.get("SDE_DIFFUSION_FAST", "0") == "1"

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import sde_diffusion as sd

STEPS = 10 if FAST else 1500  # training steps
N = 100 if FAST else 500  # samples for the Fréchet distance
plt.rcParams.update({"figure.dpi": 90})


def image_grid(ax, images, title, columns=10, xlabel=None):
    """Images (n, 8, 8, 1) in [−1, 1] tiled into one picture on ``ax`` (``sd.tile_images``)."""
    grid = sd.tile_images(np.clip(np.asarray(images), -1, 1), columns, fill=-1.0)[..., 0]
    shown = ax.imshow(grid, cmap="gray_r", vmin=-1, vmax=1)
    ax.set(title=title, xticks=[], yticks=[], xlabel=xlabel or f"{len(images)} images, 8 × 8 pixels each")
    return shown


# %% [markdown]
# ## The data
#
# `sd.digits()` maps the grey levels $0..16$ to $[-1, 1]$; `sd.digits_split()` holds out a fixed 25 %
# (449 images) for evaluation, and we train on the other 1348.

# %%
(x_train, y_train), (x_test, y_test) = sd.digits_split()
sigma_data = float(x_train.std())
print(f"training images {x_train.shape}, held out {x_test.shape}; pixel std σ_d = {sigma_data:.3f}")

fig, ax = plt.subplots(figsize=(7, 3.8))
order = np.argsort(y_train[:40], kind="stable")
shown = image_grid(ax, x_train[:40][order], "training digits (sorted by label)")
fig.colorbar(shown, ax=ax, label="pixel value", shrink=0.8)
plt.show()

# %% [markdown]
# ## Model and objective
#
# `sd.UNet` is a DDPM-style U-Net on NHWC images: a residual block at 8×8 and one at 4×4 (with
# self-attention there) on the way down and up, skip connections across, and the noise level entering
# every block through a sinusoidal embedding of $c_\text{noise} = \frac14 \log(\sigma/\alpha)$.
# EDM preconditioning (`sd.EDMPreconditioned`) makes it a denoiser
# $D_\theta(x, t) = c_\text{skip}\,\hat x + c_\text{out}\,F_\theta(c_\text{in}\hat x)$ on $\hat x = x/\alpha$, with input
# and target of unit variance at every noise level. It is trained by denoising score matching with
# EDM's weighting and log-normal noise levels, $\ln(\sigma/\alpha) \sim \mathcal N(-1.2, 1.2^2)$ (see `02_training_2d`).

# %%
vp = sd.VP()
unet = sd.UNet(1, base=32, rngs=nnx.Rngs(0))
print(f"U-Net parameters: {sum(p.size for p in jax.tree.leaves(nnx.state(unet, nnx.Param))):,}")
model = sd.EDMPreconditioned(sd.Network(unet, vp), sigma_data=sigma_data)
objective = sd.DenoisingScoreMatching(weighting=sd.EDMWeighting(sigma_data), times=sd.LogNormalNoise())
config = sd.TrainConfig(steps=STEPS, batch_size=128, learning_rate=1e-3, warmup_steps=min(200, STEPS),
                        log_every=max(STEPS // 30, 1))

start = time.perf_counter()
result = sd.train(model, objective, vp, x_train, config, progress=not FAST)
print(f"{result.step} steps in {time.perf_counter() - start:.0f} s")

fig, ax = plt.subplots(figsize=(6, 3.5))
history = [h for h in result.history if h["loss"] is not None]
ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="training loss (window mean)")
ax.set(title="EDM-weighted DSM loss", xlabel="training step", ylabel="loss", yscale="log")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## What the denoiser has learned
#
# Before sampling, look at the network directly: held-out digits noised to $x_t = \alpha x_0 + \sigma\varepsilon$
# at increasing $\tilde\sigma = \sigma/\alpha$ (left of each pair) and the EMA model's denoised guesses
# $D_\theta(x_t, t) \approx \mathbb E[x_0 \mid x_t]$ (right). At small noise it removes the noise; at large
# noise, where many digits are compatible with $x_t$, it returns a blurred average of them: the
# posterior mean, as it should.

# %%
ema = result.ema_model
noise_levels = np.array([0.05, 0.2, 0.5, 1.0, 2.0, 5.0])
ts = jax.vmap(vp.t_from_log_snr)(-2 * jnp.log(noise_levels))
clean = jnp.asarray(x_test[:5])
eps = jax.random.normal(jax.random.key(1), (len(ts),) + clean.shape)


@eqx.filter_jit
def noise_and_denoise(model):
    noisy = jax.vmap(lambda t, e: vp.alpha(t) * clean + vp.sigma(t) * e)(ts, eps)
    denoised = jax.vmap(lambda t, x: jax.vmap(model.denoiser, in_axes=(None, None, 0))(vp, t, x))(ts, noisy)
    return noisy / jax.vmap(vp.alpha)(ts)[:, None, None, None, None], denoised  # x̂ = x/α: the data's scale


noisy, denoised = noise_and_denoise(ema)
fig, axes = plt.subplots(1, len(ts), figsize=(2.2 * len(ts), 5))
for j, s in enumerate(noise_levels):
    pairs = np.stack([noisy[j], denoised[j]], axis=1).reshape(-1, 8, 8, 1)  # noisy, denoised, noisy, ...
    image_grid(axes[j], pairs, f"σ/α = {s:g}", columns=2, xlabel="$x_t/\\alpha$  |  $D_\\theta(x_t)$")
fig.suptitle("held-out digits noised to σ/α (left of each pair) and denoised by the trained U-Net (right)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Sampling
#
# DPM-Solver++(3M) integrates the probability-flow ODE from $\mathcal N(0, I)$ at $t = 1$ on 19 steps
# uniform in log-SNR down to $\sigma/\alpha = 0.002$; one last denoiser call removes the remaining noise
# (20 model evaluations per sample, on the whole batch at once).

# %%
t_end = float(vp.t_from_log_snr(-2 * np.log(0.002)))  # the score is singular at σ = 0


@eqx.filter_jit
def generate(model, key, n):
    x, info = sd.sample(vp, model, key, (n, 8, 8, 1), method=sd.DPMSolverPP(19, order=3), t_end=t_end)
    return jax.vmap(model.denoiser, in_axes=(None, None, 0))(vp, t_end, x), info.nfe + 1


start = time.perf_counter()
samples, nfe = generate(ema, jax.random.key(2), N)
samples = np.asarray(samples)
print(f"{N} samples with {nfe} model evaluations in {time.perf_counter() - start:.1f} s (compilation included)")

fig, axes = plt.subplots(1, 2, figsize=(14, 6))
image_grid(axes[0], samples[:100], f"U-Net samples ({STEPS} training steps, DPM-Solver++(3M), {nfe} NFE)")
image_grid(axes[1], x_test[:100], "held-out real digits")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## How good are they?
#
# A Fréchet distance compares the Gaussian fits of two feature distributions,
# $\text{FD} = \|\mu_a - \mu_b\|^2 + \operatorname{tr}\big(\Sigma_a + \Sigma_b - 2(\Sigma_a\Sigma_b)^{1/2}\big)$.
# `sd.digits_frechet_distance` computes it in the 64 hidden features of an MLP classifier trained on the
# training digits (its held-out accuracy, about 99 %, is printed below), against the held-out digits.
# Two reference points: real training digits (the floor: what sampling noise alone gives for this many
# images) and Gaussian noise with the data's mean and standard deviation. The classifier's labels also
# show whether the samples cover all ten digits.

# %%
classifier = sd.digits_classifier()
noise = x_train.mean() + sigma_data * np.asarray(jax.random.normal(jax.random.key(3), (N, 8, 8, 1)))
fd = {
    "real training digits": sd.digits_frechet_distance(x_train[:N], classifier=classifier),
    "U-Net samples": sd.digits_frechet_distance(np.clip(samples, -1, 1), classifier=classifier),
    "Gaussian noise": sd.digits_frechet_distance(noise, classifier=classifier),
}
for name, value in fd.items():
    print(f"Fréchet distance to held-out digits, {N} {name}: {value:8.2f}")
print(f"classifier accuracy on held-out digits: {classifier.accuracy(x_test, y_test):.3f}")

labels = np.asarray(classifier.predict(np.clip(samples, -1, 1)))
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
axes[0].bar_label(axes[0].bar(list(fd), list(fd.values()), color=["C2", "C0", "C7"]), fmt="%.1f")
axes[0].set(title="Fréchet distance in classifier features (lower is better)", ylabel="FD to held-out digits", yscale="log")
axes[0].grid(alpha=0.3, axis="y")
axes[1].bar(np.arange(10) - 0.2, np.bincount(labels, minlength=10) / N, width=0.4, label="U-Net samples")
axes[1].bar(np.arange(10) + 0.2, np.bincount(y_test, minlength=10) / len(y_test), width=0.4, label="held-out digits")
axes[1].set(title="class frequencies (samples labelled by the classifier)", xlabel="digit", ylabel="fraction",
            xticks=range(10))
axes[1].legend()
axes[1].grid(alpha=0.3, axis="y")
fig.tight_layout()
plt.show()
