# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 06 · Conditional generation: guidance, inpainting, inverse problems
#
# Conditioning a diffusion model means sampling $p(x_0 \mid c)$ instead of $p(x_0)$: a class, some observed
# pixels, a measurement. Its reverse process needs the conditional score $\nabla\log p_t(x \mid c)$ at every
# noise level, and by Bayes
#
# $$\nabla_x\log p_t(x \mid c) = \nabla_x\log p_t(x) + \nabla_x\log p_t(c \mid x).$$
#
# The methods differ in how they get the second term. In `sde_diffusion` each is a *transformation of a
# model*: it wraps a prediction and is itself one (`score` and `denoiser`), so every sampler takes it
# unchanged.
#
# | transformation | conditional score or denoiser |
# |---|---|
# | `sd.ClassifierGuidance(model, classifier, y, w)` | $s_\theta + w\,\nabla_x\log p_t(y \mid x)$ with a noise-conditional classifier |
# | `sd.ClassifierFreeGuidance(cond, uncond, w)` | $D_\varnothing + w\,(D_y - D_\varnothing)$ (one network trained with label dropout) |
# | `sd.Inpainting(model, mask, observed)` | replacement: $D = m \odot y + (1 - m)\odot D_\theta$ |
# | `sd.LinearInverseProblem(model, A, y, σ_y, w)` | DPS: $s_\theta + w\,\nabla_x\log\mathcal N\big(y;\,A\,D_\theta(x),\,\sigma_y^2 I\big)$ |
# | `sd.Resampling(method, segments, resamples)` | a *sampler* around any method: RePaint's denoise–renoise cycles |
#
# **Part 1** measures them where the truth is known: on a mixture of 8 Gaussians every conditional
# (given a class, given a coordinate, given a noisy linear measurement) is again a Gaussian mixture
# whose noised marginals, scores and samples are exact (`sd.GaussianMixture`). **Part 2** trains a
# class-conditional U-Net on the 8×8 digits and sweeps the classifier-free guidance scale; **part 3**
# fills in the bottom halves of held-out digits.
#
# **Fast mode** (`SDE_DIFFUSION_FAST=1`, the test suite) uses few samples and trains the U-Net for a
# handful of steps: its digits are noise. The numbers quoted in the text were measured in a full run
# (`SDE_DIFFUSION_FAST=0`, the default; three to five minutes on two CPU cores, most of it training the U-Net).

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
from sde_diffusion.cli import denoising_time

N = 500 if FAST else 4000  # samples per method on the 2-D mixture
TRAIN_STEPS = 20 if FAST else 1500  # the class-conditional U-Net
PER_CLASS = 4 if FAST else 100  # digits generated per class and guidance scale
INPAINT_DIGITS = 4 if FAST else 100  # held-out digits whose bottom half is filled in
COMPLETIONS = 2 if FAST else 4  # completions per digit
RESAMPLE_SEGMENTS = 2 if FAST else 10  # fewer model evaluations in fast mode
plt.rcParams.update({"figure.dpi": 90})
print(f"fast mode: {FAST}")

# %% [markdown]
# ## Part 1 · Exact posteriors on the ring
#
# The data: 8 Gaussian components with means on the unit circle and per-axis standard deviations between
# 0.05 and 0.15 (`sd.gaussian_mixture_oracle()`, the distribution `sd.gaussian_mixture` samples), under the
# VP SDE. `Exact` below turns any such mixture into a model with its exact score and denoiser at every
# $t$. The mixture is an array leaf of the model, so a sampler compiled for one mixture runs another of the
# same shapes without recompiling; so are the labels, masks, observations and guidance scales inside the
# guidance transformations.
#
# Samples are compared by the sliced Wasserstein-2 distance (SW2, 512 random directions) to exact samples
# of the target. Two independent exact sample sets of the same size are not at distance 0: their SW2 is
# the **noise floor**, what a perfect sampler scores.

# %%
sde = sd.VP()
ring = sd.gaussian_mixture_oracle()
T_END = 1e-3  # the exact scores are singular at t = 0
ode = sd.DPMSolverPP(order=3, num_steps=40, grid=sd.UniformLogSNR())  # 40 NFE
euler_maruyama = sd.ReverseDiffusion(num_steps=200, grid=sd.UniformLogSNR())  # the reverse SDE, 200 NFE


class Exact(sd.AbstractPrediction):
    """The exact score and denoiser of a Gaussian mixture's noised marginals p_t."""

    mixture: sd.GaussianMixture

    def score(self, sde, t, x):
        return self.mixture.marginal_score(sde, t, x)

    def denoiser(self, sde, t, x):
        return self.mixture.denoiser(sde, t, x)


def draw(model, method=ode, key=1):
    """N samples of `model` at t = T_END, as NumPy, and the NFE spent."""
    x, info = sd.sample(sde, model, jax.random.key(key), (N, 2), method=method, t_end=T_END)
    return np.asarray(x), info.nfe


def sw2(a, b):
    return float(sd.sliced_wasserstein(a, b, jax.random.key(99)))


def exact_samples(mixture, key):
    return np.asarray(mixture.sample(jax.random.key(key), N))


def show_ring(ax, x, title, color="C0"):
    ax.scatter(*ring_reference.T, s=1, color="0.85")
    ax.scatter(*x[:1500].T, s=2, alpha=0.5, color=color)
    ax.set(title=title, xlim=(-1.7, 1.7), ylim=(-1.7, 1.7), aspect="equal", xticks=[-1, 0, 1], yticks=[-1, 0, 1])


ring_reference = exact_samples(ring, 0)

# %% [markdown]
# ### (a) Class-conditional sampling
#
# Give neighbouring components a common class, $c(k) = \lfloor k/2\rfloor$: four classes, each a pair of
# components. The exact noise-conditional classifier $\log p_t(c \mid x_t)$ is closed-form
# (`ring.class_log_probs(sde, t, x, CLASSES)`), and so is the class conditional $p_0(x \mid c)$
# (`ring.given_class(c, CLASSES)`). By Bayes, classifier guidance at $w = 1$ with the exact classifier *is*
# the exact conditional score. Sampled with DPM-Solver++(3M), 40 steps, for each class:

# %%
CLASSES = [0, 0, 1, 1, 2, 2, 3, 3]  # class of each component


def exact_classifier(t, x):
    """log p_t(c | x_t = x), the exact noise-conditional classifier (logits of shape (4,))."""
    return ring.class_log_probs(sde, t, x, CLASSES)


unconditional = Exact(ring)
classifier_guided = {}
print(f"{'class':>5s} {'noise floor':>12s} {'classifier guidance, exact classifier':>38s}")
for label in range(4):
    target = ring.given_class(label, CLASSES)
    reference = exact_samples(target, 2)
    classifier_guided[label], nfe = draw(sd.ClassifierGuidance(unconditional, exact_classifier, label, scale=1.0))
    print(f"{label:5d} {sw2(exact_samples(target, 3), reference):12.4f} {sw2(classifier_guided[label], reference):38.4f}")

# %% [markdown]
# Measured in a full run (4000 samples): the guided samples are within the noise floor of exact class samples
# for all four classes (SW2 0.007–0.018 against floors 0.013–0.024), with one compilation for all of them:
# the label is an array leaf of `sd.ClassifierGuidance`.
#
# **Classifier-free guidance** combines a conditional and an unconditional model,
# $D_w = D_\varnothing + w\,(D_y - D_\varnothing)$, i.e. $s_w = s_\varnothing + w\,\nabla\log p_t(y \mid x)$ with the
# *implicit* classifier $p_t(y \mid x) \propto p_t(x \mid y)/p_t(x)$: with exact models it equals classifier guidance
# at the same $w$ (`tests/test_guidance.py` checks this). $w = 0$ is the unconditional model, $w = 1$ the
# conditional one, and $w > 1$ gives at every $t$ the score of $p_t(x)\,p_t(y \mid x)^w$: a family of densities
# that are not the noised marginals of any one distribution (not even of $p_0(x)\,p_0(y \mid x)^w$). For class 1 (components 2 and 3, at 90° and 135°) with exact scores:

# %%
LABEL = 1
target = ring.given_class(LABEL, CLASSES)
reference = exact_samples(target, 2)
conditional = Exact(target)
SCALES = [0.0, 1.0, 2.0, 4.0]
cfg_samples = {w: draw(sd.ClassifierFreeGuidance(conditional, unconditional, w))[0] for w in SCALES}
clean_classifier = jax.jit(jax.vmap(lambda x: exact_classifier(0.0, x)))  # log p(c | x0) at t = 0


def class_summary(x):
    """SW2 to the class, fraction classified into it, mean log p(y | x0), mean radius, and for the samples in
    the class, per component (split at 112.5°), the mean angle and the angular standard deviation in degrees."""
    log_probs = np.minimum(np.asarray(clean_classifier(x)), 0.0)  # ≤ 0 up to rounding
    inside = log_probs.argmax(1) == LABEL
    angle = np.degrees(np.arctan2(x[inside, 1], x[inside, 0]))
    upper = angle < 112.5
    return (sw2(x, reference), np.mean(inside), np.mean(log_probs[:, LABEL]), np.mean(np.linalg.norm(x, axis=1)),
            angle[upper].mean(), angle[~upper].mean(), angle[upper].std(), angle[~upper].std())


row = "{:9.3f} {:17.1e} {:12.3f}   {:5.1f}° / {:5.1f}°   {:4.1f}° / {:4.1f}°"
print(f"{'':22s} {'SW2 to class':>13s} {'in class':>9s} {'mean log p(y|x0)':>17s} {'mean radius':>12s}   "
      f"{'mean angles':>15s}   {'angular std':>13s}")
floor = sw2(exact_samples(target, 3), reference)
print(f"{'exact class samples':22s} {'(floor) %.4f' % floor:>13s} " + row.format(*class_summary(reference)[1:]))
for w, x in cfg_samples.items():
    summary = class_summary(x)
    print(f"{'CFG, w = %g' % w:22s} {summary[0]:13.4f} " + row.format(*summary[1:]))

fig, axes = plt.subplots(1, 6, figsize=(19, 3.9), layout="constrained")
show_ring(axes[0], reference, f"exact p(x | y = {LABEL})", color="k")
show_ring(axes[1], classifier_guided[LABEL], "classifier guidance, w = 1\n(exact noisy classifier)", color="C2")
for ax, (w, x) in zip(axes[2:], cfg_samples.items()):
    show_ring(ax, x, f"CFG w = {w:g}" + {0.0: " (unconditional)", 1.0: " (conditional)"}.get(w, ""))
fig.suptitle(f"class {LABEL} = components 2 and 3: exact samples, classifier guidance and classifier-free guidance with exact scores; grey: the data")
plt.show()

# %% [markdown]
# Measured in a full run: $w = 0$ gives the whole ring (24 % in class 1, SW2 0.81); $w = 1$ the class within
# the floor (SW2 0.018, 100 % in class). Beyond that there is nothing left to gain, since the conditional samples
# were already all in the class (mean $\log p(y \mid x_0)$ is 0 to within $2\cdot 10^{-6}$ from $w = 1$ on), and
# guidance only distorts: it pushes the samples away from the other classes, outward off the circle (mean
# radius 1.01 for the data, 1.07 at $w = 2$, 1.16 at $w = 4$), and the two components towards each other and
# narrower (mean angles 90° / 135° → 94° / 131° → 97° / 127°, angular std 6° → 4–5° → 3–4°). SW2 to the
# class grows to 0.08 at $w = 2$ and 0.16 at $w = 4$. Guidance pays off only when the conditional model is too
# weak to separate the classes on its own (part 2).

# %% [markdown]
# ### (b) Inpainting: observe $x_1 = 0.7$, sample $x_2$
#
# Observing coordinates exactly, $p(x_2 \mid x_1 = 0.7)$ is a mixture over $x_2$ (`ring.conditional(mask, values)`):
# mostly the components at ±45°, so $x_2 \approx \pm 0.71$, with more weight on the upper one, whose component
# is narrower along $x_1$ and so explains $x_1 = 0.7$ better. Three samplers:
#
# - the **exact conditional score**: $x_{t,1} \mid x_{0,1} = 0.7$ is Gaussian, $x_{t,2}$ follows the conditional
#   mixture's marginal, and the two are independent given $x_{0,1}$;
# - **replacement** (`sd.Inpainting` around the exact *joint* denoiser): the observed entry of the denoiser is
#   set to 0.7, the free one is the joint model's $\mathbb E[x_{0,2} \mid x_t]$, which conditions on the noisy
#   $x_{t,1}$, not on $x_{0,1} = 0.7$;
# - **resampling** (`sd.Resampling`, RePaint) around replacement: the span is cut into segments, and each
#   segment is run, noised back to its start by the exact forward kernel and run again, several times.

# %%
mask, values = jnp.array([True, False]), jnp.array([0.7, 0.0])
x2_given = ring.conditional(mask, values)  # p(x2 | x1 = 0.7), a mixture over x2


class ExactInpainting(sd.AbstractPrediction):
    """The exact score of p_t(x_t | x_{0,1} = value): x_{t,1} ~ N(α value, σ²), x_{t,2} ~ conditional."""

    conditional: sd.GaussianMixture
    value: jax.Array

    def score(self, sde, t, x):
        observed = (sde.alpha(t) * self.value - x[0]) / sde.sigma2(t)
        return jnp.stack([observed, self.conditional.marginal_score(sde, t, x[1:])[0]])

    def denoiser(self, sde, t, x):
        return (x + sde.sigma2(t) * self.score(sde, t, x)) / sde.alpha(t)


def w2_1d(a, b):
    return float(np.sqrt(np.mean((np.sort(a) - np.sort(b)) ** 2)))


inner = sd.DPMSolverPP(order=2, num_steps=2, grid=sd.UniformLogSNR())
RESAMPLING = [(RESAMPLE_SEGMENTS, 3)] if FAST else [(10, 5), (20, 10)]  # (segments, resamples)
replacement = sd.Inpainting(unconditional, mask, values)
x2_exact = exact_samples(x2_given, 2)[:, 0]
inpainted = {"exact conditional score": draw(ExactInpainting(x2_given, jnp.float32(0.7)))}
inpainted["replacement (sd.Inpainting)"] = draw(replacement)
for segments, resamples in RESAMPLING:
    method = sd.Resampling(inner, num_segments=segments, num_resamples=resamples, grid=sd.UniformLogSNR())
    inpainted[f"resampling, {segments} segments × {resamples}"] = draw(replacement, method)

print(f"{'':34s} {'NFE':>5s} {'P(x2 > 0)':>10s} {'P(|x2| < 0.35)':>15s} {'W2 of x2':>13s} {'max |x1 − 0.7|':>15s}")
print(f"{'exact p(x2 | x1 = 0.7) samples':34s} {'':>5s} {np.mean(x2_exact > 0):10.3f} {np.mean(np.abs(x2_exact) < 0.35):15.3f} "
      f"{'(floor) %.3f' % w2_1d(exact_samples(x2_given, 3)[:, 0], x2_exact):>13s}")
for name, (x, nfe) in inpainted.items():
    print(f"{name:34s} {nfe:5d} {np.mean(x[:, 1] > 0):10.3f} {np.mean(np.abs(x[:, 1]) < 0.35):15.3f} "
          f"{w2_1d(x[:, 1], x2_exact):13.3f} {np.max(np.abs(x[:, 0] - 0.7)):15.3f}")

grid = np.linspace(-1.3, 1.3, 400)
density = np.exp(np.asarray(jax.vmap(x2_given.log_prob)(grid[:, None])))
fig, axes = plt.subplots(1, 2, figsize=(14, 3.8), gridspec_kw={"width_ratios": [2, 1]})
bins = np.linspace(-1.3, 1.3, 60)
for (name, (x, _)), color in zip(inpainted.items(), ["C2", "C0", "C1", "C3"]):
    axes[0].hist(x[:, 1], bins=bins, density=True, histtype="step", lw=1.5, color=color, label=name)
axes[0].plot(grid, density, "k--", lw=1, label="exact p(x2 | x1 = 0.7)")
axes[0].set(title="inpainting on the ring: the free coordinate", xlabel="$x_2$", ylabel="density")
axes[0].legend(fontsize=8)
show_ring(axes[1], inpainted["replacement (sd.Inpainting)"][0], "replacement samples")
axes[1].axvline(0.7, color="k", lw=0.5)
fig.tight_layout()
plt.show()

# %% [markdown]
# Measured in a full run (4000 samples): exact $P(x_2 > 0) = 0.62$, and 5 % of the mass near $x_2 = 0$ (the component
# at $(1, 0)$); the exact conditional score reproduces both (0.62, 4 %; W2 0.012 against a floor of 0.04).
# Replacement keeps the observation ($|x_1 - 0.7| \le 0.04$ at $\sigma(t_\text{end}) \approx 0.01$) and finds the modes
# with the right shapes, but with the wrong weights: it splits the two main modes evenly, $P(x_2 > 0) = 0.50$,
# and puts 20 % near $x_2 = 0$ (W2 0.29). Resampling did **not** fix the split: 0.50 with 10 segments × 5
# (100 NFE) and 0.49 with 20 × 10 (400 NFE); it only moved some of the middle mass back (18 %, 14 %), and its
# W2 (0.30, 0.33) is no better. In quick runs outside this notebook, with Euler–Maruyama inside the
# segments (20 × 10 and 50 × 20, up to 2000 NFE), the split stayed at 0.49–0.50 too.
#
# Why: what tells the two modes apart is *how sharply* each component pins $x_1$ at 0.7 (the upper one
# has standard deviation 0.08 along $x_1$, the lower one 0.14, hence 0.60 : 0.36). That detail is only
# visible in $x_{t,1}$ once the noise is below about 0.1, and by then the two modes in $x_2$ are 1.4 apart and
# no step moves samples between them. At higher noise replacement conditions on $x_{t,1} = \alpha\cdot 0.7 + \sigma\varepsilon$,
# which says "$x_1$ is near 0.7" but not which component put it there, so the split follows the prior:
# even. Resampling mixes the free coordinate towards $\int p_t(x_2 \mid x_{t,1})\,p(x_{t,1} \mid x_{0,1} = 0.7)\,\mathrm dx_{t,1}$ at each
# noise level, the same average over noisy observations, not $p_t(x_2 \mid x_{0,1} = 0.7)$. It harmonises
# images (part 3) but cannot recover information that the noised observation does not carry.

# %% [markdown]
# ### (c) A linear inverse problem: DPS against the exact posterior
#
# Observe $y = A x_0 + \sigma_y\xi$ with $A = [1,\ 0.5]$, $y = 0.8$, $\sigma_y = 0.1$: a noisy measurement along one
# direction. The exact posterior $p(x_0 \mid y)$ is again a mixture (`ring.posterior(A, y, σ_y)`), mostly on
# the three components near the line $x_1 + 0.5\,x_2 = 0.8$. Sampling it through its exact marginal score is
# the reference sampler; DPS (`sd.LinearInverseProblem`) guides the exact *prior* model with
# $\nabla_x\log\mathcal N(y;\,A\,D(x_t),\,\sigma_y^2)$, which replaces $p(y \mid x_t)$ by a Gaussian around the
# denoised guess and ignores the spread of $x_0$ given $x_t$. It is run with Euler–Maruyama on the reverse SDE
# (200 steps, uniform in log-SNR) and with DPM-Solver++(3M) on the probability-flow ODE (40 steps), at several
# scales $w$ (one compilation per sampler: the scale is an array leaf).

# %%
A, y_obs, sigma_y = jnp.array([[1.0, 0.5]]), jnp.array([0.8]), 0.1
posterior = ring.posterior(A, y_obs, sigma_y)
post_reference = exact_samples(posterior, 2)
DPS_SCALES = {"Euler–Maruyama": [0.3, 0.5, 1.0, 2.0], "DPM-Solver++": [0.5, 1.0, 2.0, 4.0]}


def residual(x):
    return x @ np.asarray(A).T[:, 0] - float(y_obs[0])


inverse = {
    "exact posterior samples (floor)": (exact_samples(posterior, 3), 0),
    "exact posterior score, DPM-Solver++": draw(Exact(posterior)),
    "exact posterior score, Euler–Maruyama": draw(Exact(posterior), euler_maruyama),
}
for name, method in [("Euler–Maruyama", euler_maruyama), ("DPM-Solver++", ode)]:
    for w in DPS_SCALES[name]:
        inverse[f"DPS w = {w:g}, {name}"] = draw(sd.LinearInverseProblem(unconditional, A, y_obs, sigma_y, w), method)
inverse["prior (no conditioning)"] = (ring_reference, 0)

print(f"{'':40s} {'NFE':>4s} {'SW2':>7s} {'mean A x − y':>13s} {'std A x − y':>12s}")
print(f"{'exact posterior (reference)':40s} {'':>4s} {'':>7s} {residual(post_reference).mean():13.3f} {residual(post_reference).std():12.3f}")
for name, (x, nfe) in inverse.items():
    print(f"{name:40s} {nfe:4d} {sw2(x, post_reference):7.3f} {residual(x).mean():13.3f} {residual(x).std():12.3f}")

# %%
shown = ["exact posterior score, DPM-Solver++", "DPS w = 0.5, Euler–Maruyama", "DPS w = 1, Euler–Maruyama",
         "DPS w = 1, DPM-Solver++", "DPS w = 4, DPM-Solver++"]
fig, axes = plt.subplots(1, len(shown) + 1, figsize=(19, 3.8), layout="constrained")
line = np.linspace(-1.7, 1.7, 2)
show_ring(axes[0], post_reference, "exact p(x0 | y) samples", color="k")
for ax, name in zip(axes[1:], shown):
    x = inverse[name][0]
    show_ring(ax, x, f"{name}\nSW2 {sw2(x, post_reference):.3f}", color="C1" if "DPS" in name else "C2")
for ax in axes:
    ax.plot(line, (0.8 - line) / 0.5, "k:", lw=0.8)  # A x = y
    ax.title.set_fontsize(9)
fig.suptitle("y = x1 + 0.5 x2 = 0.8 ± 0.1 (dotted line): exact posterior against DPS with the exact prior model")
plt.show()

# %% [markdown]
# Measured in a full run (4000 samples; floor 0.017, prior 0.67): the exact posterior score gives SW2 0.021 with
# DPM-Solver++ and 0.027 with Euler–Maruyama, within sampling noise. DPS is biased: with Euler–Maruyama it
# reached SW2 0.11 at $w = 0.3$–$0.5$, 0.15 at $w = 1$ and 0.17 at $w = 2$; larger $w$ pulls the samples ever
# tighter onto the line (residual std 0.13 at $w = 0.5$, 0.087 at $w = 1$, 0.055 at $w = 2$, against the
# posterior's 0.12). On the probability-flow ODE it is much worse: SW2 0.30–0.39 for $w \le 2$, with the samples
# off the line (mean residual 0.19–0.37, against the posterior's 0.03), and $w = 4$ lands on the line but in
# the wrong places (SW2 0.67, no better than the prior). The ODE's field takes *half* the score, hence half the
# guidance, but doubling $w$ does not cure it: without the reverse SDE's noise nothing corrects the early
# mistakes of a guidance term that is wrong at high noise. DPS is an SDE method.

# %% [markdown]
# ## Part 2 · A class-conditional U-Net on digits with classifier-free guidance
#
# One network learns both $D_\theta(x, t \mid y)$ and the unconditional $D_\theta(x, t) = D_\theta(x, t \mid \varnothing)$:
# `sd.UNet(1, num_classes=10)` embeds the label (class 10 is the null label $\varnothing$) and adds it to the
# noise-level embedding in every block, and `sd.LabelDropout` replaces each training label by $\varnothing$ with
# probability 0.15. Everything else is notebook 04's setup: EDM preconditioning on the VP SDE, EDM weighting
# and log-normal noise levels, 1500 steps of batch 128 on the 1348 training digits.

# %%
(x_train, y_train), (x_test, y_test) = sd.digits_split()
sigma_data = float(x_train.std())
vp = sd.VP()
unet = sd.UNet(1, base=32, num_classes=10, rngs=nnx.Rngs(0))
digits_model = sd.EDMPreconditioned(sd.Network(unet, vp), sigma_data=sigma_data)
objective = sd.LabelDropout(
    sd.DenoisingScoreMatching(weighting=sd.EDMWeighting(sigma_data), times=sd.LogNormalNoise()), num_classes=10, rate=0.15
)
config = sd.TrainConfig(steps=TRAIN_STEPS, batch_size=128, learning_rate=1e-3, warmup_steps=min(200, TRAIN_STEPS),
                        log_every=max(TRAIN_STEPS // 30, 1))
start = time.perf_counter()
result = sd.train(digits_model, objective, vp, (x_train, y_train), config, progress=False)
print(f"{result.step} training steps in {time.perf_counter() - start:.0f} s")
trained = result.ema_model

# %% [markdown]
# Sampling as in the command line's `sde-diffusion sample`: DPM-Solver++(3M) on 19 steps uniform in log-SNR
# down to $\sigma/\alpha = 0.002$ (`denoising_time`), then one denoiser call. With guidance each evaluation is two
# network passes. The model for class $y$ at scale $w$ is
# `sd.ClassifierFreeGuidance(sd.with_label(trained, y), sd.with_label(trained, None), w)`: label and scale are
# array leaves, so one compiled sampler serves all 40 (class, scale) pairs.

# %%
t_end = denoising_time(vp)
method = sd.DPMSolverPP(num_steps=19, order=3, grid=sd.UniformLogSNR())


@eqx.filter_jit
def final_denoise(model, x):
    return jax.vmap(model.denoiser, in_axes=(None, None, 0))(vp, t_end, x)


def generate(model, key, n, method=method):
    """n digits of `model`: the sampler down to σ/α = 0.002, then one denoiser call."""
    x, info = sd.sample(vp, model, key, (n, 8, 8, 1), method=method, t_end=t_end)
    return np.clip(np.asarray(final_denoise(model, x)), -1, 1), info.nfe + 1


def guided(label, w):
    return sd.ClassifierFreeGuidance(sd.with_label(trained, label), sd.with_label(trained, None), w)


start = time.perf_counter()
digits = {}  # scale -> (10, PER_CLASS, 8, 8, 1)
for w in SCALES:
    digits[w] = np.stack([generate(guided(c, w), jax.random.key(100 + c), PER_CLASS)[0] for c in range(10)])
_, nfe = generate(guided(0, 1.0), jax.random.key(0), 2)
print(f"{len(SCALES)} scales × 10 classes × {PER_CLASS} digits in {time.perf_counter() - start:.0f} s, "
      f"{nfe} evaluations (of 2 network passes) per digit")

# %%
classifier = sd.digits_classifier()
requested = np.repeat(np.arange(10), PER_CLASS)
print(f"classifier accuracy on held-out real digits: {classifier.accuracy(x_test, y_test):.3f}")
print(f"{'scale w':>8s} {'accuracy w.r.t. requested class':>32s} {'Fréchet distance':>17s}")
scores = {}
for w, images in digits.items():
    flat = images.reshape(-1, 8, 8, 1)
    scores[w] = (classifier.accuracy(flat, requested), sd.digits_frechet_distance(flat, classifier=classifier))
    print(f"{w:8g} {scores[w][0]:32.3f} {scores[w][1]:17.2f}")
real = x_train[: len(requested)]
print(f"{len(real)} real training digits: Fréchet distance {sd.digits_frechet_distance(real, classifier=classifier):.2f}")
print("accuracy per requested digit 0 … 9:")
for w, images in digits.items():
    correct = np.asarray(classifier.predict(images.reshape(-1, 8, 8, 1))).reshape(10, PER_CLASS) == np.arange(10)[:, None]
    print(f"  w = {w:g}: " + " ".join(f"{a:.2f}" for a in correct.mean(1)))


def image_grid(ax, images, title, columns=10, xlabel=None):
    """Images (n, 8, 8, 1) in [−1, 1] tiled into one picture on ``ax`` (``sd.tile_images``)."""
    grid = sd.tile_images(np.clip(np.asarray(images), -1, 1), columns, fill=-1.0)[..., 0]
    shown = ax.imshow(grid, cmap="gray_r", vmin=-1, vmax=1)
    ax.set(title=title, xticks=[], yticks=[], xlabel=xlabel or f"{len(images)} images, 8 × 8 pixels each")
    return shown


SHOW = min(PER_CLASS, 8)
fig, axes = plt.subplots(1, len(SCALES), figsize=(4.4 * len(SCALES), 5.8), layout="constrained")
for ax, (w, images) in zip(axes, digits.items()):
    name = {0.0: " (unconditional)", 1.0: " (conditional)"}.get(w, "")
    image_grid(ax, images[:, :SHOW].reshape(-1, 8, 8, 1), f"w = {w:g}{name}", columns=SHOW,
               xlabel=f"accuracy {scores[w][0]:.2f}, FD {scores[w][1]:.1f}")
axes[0].set_ylabel("requested digit: 0 (top) … 9 (bottom)")
fig.suptitle(f"classifier-free guidance on the digits U-Net ({result.step} training steps), one row per class")
plt.show()

# %% [markdown]
# Measured in a full run (100 digits per class and scale, Fréchet distances to the 449 held-out digits; the
# classifier scores 0.99 on held-out real digits, and 1000 real training digits have FD 2.4):
#
# | scale $w$ | accuracy w.r.t. the requested class | Fréchet distance |
# |---|---|---|
# | 0 (unconditional) | 0.09 (chance) | 9.3 |
# | 1 (conditional) | 0.92 | 3.4 |
# | 2 | 0.999 | 6.9 |
# | 4 | 1.000 | 18.4 |
#
# The plain conditional model ($w = 1$) already draws the requested digit 92 % of the time (per digit from
# 0.86 to 0.97), and its samples are the closest to real digits: closer than the unconditional model's, which
# had only the 15 % of dropped labels to learn from. Guidance buys class fidelity with diversity: at $w = 2$
# practically every digit is the requested one, but the FD doubles; at $w = 4$ the digits are bold, uniform
# prototypes (see the grid) and the FD is 5× that of $w = 1$. Unlike the exact ring of part 1, the learned
# conditional model does not separate the classes perfectly, so there $w \approx 1.5$–2 is worth its price.

# %% [markdown]
# ## Part 3 · Inpainting digits
#
# Held-out digits with their bottom half (rows 4–7) hidden: `sd.Inpainting(sd.with_label(trained, None), mask,
# observed)` fills it in with the *unconditional* model (the null label; the class is not given). The mask and
# the observed digit are array leaves: one compiled sampler for every digit. Two samplers: replacement with
# DPM-Solver++(3M) as above (20 NFE), and `sd.Resampling` around a 2-step DPM-Solver++(2M) on 10 segments,
# each run 5 times (100 NFE). The digits classifier then labels the completions; it should recover the true
# digit when the completion is right.

# %%
mask = np.zeros((8, 8, 1), bool)
mask[:4] = True  # observed: the top half
unconditional_digits = sd.with_label(trained, None)
resample = sd.Resampling(sd.DPMSolverPP(num_steps=2, order=2, grid=sd.UniformLogSNR()),
                         num_segments=RESAMPLE_SEGMENTS, num_resamples=5, grid=sd.UniformLogSNR())
RESAMPLED = f"resampling {RESAMPLE_SEGMENTS} × 5"
samplers = {"replacement": method, RESAMPLED: resample}
if not FAST:  # replacement with as many evaluations as resampling
    samplers["replacement, 99 steps"] = sd.DPMSolverPP(num_steps=99, order=3, grid=sd.UniformLogSNR())
per_digit = max(INPAINT_DIGITS // 10, 1)
chosen = np.concatenate([np.flatnonzero(y_test == c)[:per_digit] for c in range(10)])[:INPAINT_DIGITS]
originals, labels = x_test[chosen], y_test[chosen]  # the first held-out examples of each digit
completions, samplers_nfe = {name: [] for name in samplers}, {}
start = time.perf_counter()
for i, image in enumerate(originals):
    model = sd.Inpainting(unconditional_digits, jnp.asarray(mask), image)
    for name, sampler in samplers.items():
        filled, nfe = generate(model, jax.random.key(1000 + i), COMPLETIONS, sampler)
        completions[name].append(filled)
        samplers_nfe[name] = nfe
completions = {name: np.stack(c) for name, c in completions.items()}  # (digits, completions, 8, 8, 1)
print(f"{INPAINT_DIGITS} digits × {COMPLETIONS} completions × {len(samplers)} samplers in {time.perf_counter() - start:.0f} s")

top_only = np.where(mask, originals, -1.0)  # bottom half blank
print(f"classifier accuracy against the true labels, {INPAINT_DIGITS} held-out digits:")
print(f"  {'original digits':34s} {classifier.accuracy(originals, labels):.3f}")
print(f"  {'top half only (bottom blank)':34s} {classifier.accuracy(top_only, labels):.3f}")
for name, filled in completions.items():
    accuracy = classifier.accuracy(filled.reshape(-1, 8, 8, 1), np.repeat(labels, COMPLETIONS))
    error = np.sqrt(np.mean((filled - originals[:, None])[:, :, 4:] ** 2))
    print(f"  {name + ' (%d NFE)' % samplers_nfe[name]:34s} {accuracy:.3f}   (RMS difference of the filled half from "
          f"the original {error:.3f}; of the observed half {np.abs(filled - originals[:, None])[:, :, :4].max():.1e})")
predicted = np.asarray(classifier.predict(completions["replacement"].reshape(-1, 8, 8, 1)))
truth = np.repeat(labels, COMPLETIONS)
pairs, counts = np.unique(np.stack([truth, predicted])[:, truth != predicted], axis=1, return_counts=True)
print("replacement's most frequent mistakes (true → completed as):",
      ", ".join(f"{a} → {b}: {n}" for (a, b), n in sorted(zip(pairs.T.tolist(), counts), key=lambda p: -p[1])[:6]))

# %%
rows, SHOWN = np.arange(0, len(chosen), per_digit)[:10], min(COMPLETIONS, 4)  # one held-out example per digit
masked_view = np.where(mask, originals, 0.0)  # hidden half shown grey
panels = [originals[rows, None], masked_view[rows, None]] + [completions[name][rows, :SHOWN] for name in ("replacement", RESAMPLED)]
fig, ax = plt.subplots(figsize=(2 + 1.1 * (2 + 2 * SHOWN), 1.1 * len(rows) + 1.5))
image_grid(ax, np.concatenate(panels, axis=1).reshape(-1, 8, 8, 1), "inpainting the bottom half of held-out digits",
           columns=2 + 2 * SHOWN,
           xlabel=f"original | observed (grey: hidden) | {SHOWN} × replacement | {SHOWN} × resampling")
plt.show()

# %% [markdown]
# Measured in a full run (the first 10 held-out examples of each digit × 4 completions each):
#
# | input | classifier accuracy w.r.t. the true digit | RMS difference of the filled half from the original |
# |---|---|---|
# | the original digits | 0.99 | |
# | top half only, bottom blank | 0.26 | |
# | replacement, DPM-Solver++(3M), 20 NFE | 0.47 | 0.72 |
# | replacement, DPM-Solver++(3M) with 99 steps, 100 NFE | 0.47 | 0.72 |
# | resampling 10 segments × 5, 101 NFE | 0.62 | 0.62 |
#
# The observed half is kept exactly (the denoiser returns it) and the completions look like digits, but
# often not the digit that was written: a top half leaves several digits possible, and replacement's most
# frequent mistakes (of 400 completions) were 2 → 3 (15), 5 → 6 and 9 → 8 (11 each), 6 → 4 and 7 → 3 (9 each).
# Resampling helps here, unlike on the ring: 0.62 against 0.47, with completions closer to the originals,
# and not by spending more evaluations (replacement with 100 NFE stayed at 0.47). The likely reason: on
# images, replacement's defect is largely *incoherence* between the halves (the free half is denoised
# against a noisy copy of the observed one), a mismatch of nearby pixels that is visible at moderate noise,
# where denoise–renoise cycles can still repair it. What the ring's observation lacked (which component
# produced $x_1 = 0.7$) was invisible at every noise level where samples can still move between modes.
#
# ## Summary
#
# - Guidance methods are model transformations (`sd.ClassifierGuidance`, `sd.ClassifierFreeGuidance`,
#   `sd.Inpainting`, `sd.LinearInverseProblem`) that any sampler takes; `sd.Resampling` wraps any sampler.
#   Labels, masks, observations and scales are array leaves: one compilation serves them all.
# - With exact ingredients, classifier guidance at $w = 1$ is the exact conditional score (samples within the
#   noise floor). Guidance scales $w > 1$ do not sample the class conditional: they concentrate the samples
#   away from the other classes, which pays only when the conditional model is weak (digits: accuracy 0.92 →
#   1.00 from $w = 1$ to 2, at twice the Fréchet distance).
# - Replacement inpainting and DPS are biased even with the exact prior model. Replacement got the mode
#   weights of the ring's conditional wrong (0.50 against 0.62), and resampling did not correct them; on
#   digits resampling did help (completions recognised as the true digit 0.62 against 0.47). DPS did best
#   on the reverse SDE with $w = 0.3$–$0.5$ (SW2 0.11 against a floor of 0.017) and failed on the
#   probability-flow ODE.
