"""Sample quality on the 8×8 digits without downloads: an FID-like Fréchet distance.

A small classifier (``DigitsClassifier``) is trained on a fixed split of scikit-learn's digits;
``digits_frechet_distance`` fits Gaussians to its penultimate-layer features of samples and of real
held-out digits and returns their Fréchet (2-Wasserstein) distance

    FD = ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^{1/2} Σb Σa^{1/2})^{1/2}).

Like FID it is biased upwards for few samples: compare models at equal sample sizes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, ArrayLike

from .data import ArrayDataset, digits, train_test_split


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """``A^{1/2}`` of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    lam, u = np.linalg.eigh(a)
    return (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Fréchet distance between Gaussian fits (mean, unbiased covariance) of two feature sets of
    shapes ``(n_a, d)`` and ``(n_b, d)``, in float64 with symmetric eigendecompositions:
    ``tr((Σa^{1/2} Σb Σa^{1/2})^{1/2})`` is the sum of square roots of that matrix's eigenvalues."""
    fa, fb = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    for name, f in (("features_a", fa), ("features_b", fb)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must have shape (n, d) with n ≥ 2, got {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError(f"{name} contains non-finite values")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dimensions differ: {fa.shape[1]} and {fb.shape[1]}")
    cov_a, cov_b = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (fa, fb))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum()
    mean_term = np.sum((fa.mean(axis=0) - fb.mean(axis=0)) ** 2)
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


class DigitsClassifier(nnx.Module):
    """MLP ``64 → hidden → features → 10`` (GELU) on flattened 8×8 digits in ``[−1, 1]``."""

    def __init__(self, *, hidden: int = 128, features: int = 64, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.penultimate = nnx.Linear(hidden, features, rngs=rngs)
        self.head = nnx.Linear(features, 10, rngs=rngs)

    def features(self, x: ArrayLike) -> Array:
        """Penultimate-layer activations ``(n, features)`` of images ``(n, 8, 8[, 1])`` or ``(n, 64)``."""
        x = jnp.asarray(x, dtype=jnp.float32)
        return jax.nn.gelu(self.penultimate(jax.nn.gelu(self.hidden(x.reshape(x.shape[0], 64)))))

    def __call__(self, x: ArrayLike) -> Array:
        """Class logits ``(n, 10)``."""
        return self.head(self.features(x))

    def predict(self, x: ArrayLike) -> Array:
        """Predicted labels ``(n,)``."""
        return jnp.argmax(self(x), axis=-1)

    def accuracy(self, x: ArrayLike, labels: ArrayLike) -> float:
        """Fraction of ``x`` classified as ``labels``."""
        return float(jnp.mean(self.predict(x) == jnp.asarray(labels)))


def digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The fixed split of ``digits()`` used here: ``((x_train, y_train), (x_test, y_test))``, 25 %
    (449 images) held out with seed 0."""
    x, labels = digits()
    return train_test_split(x, labels, test_fraction=0.25, seed=0)


def train_digits_classifier(
    seed: int = 0, steps: int = 600, batch_size: int = 128, learning_rate: float = 3e-3
) -> DigitsClassifier:
    """Train ``DigitsClassifier`` with Adam on cross-entropy over the training part of
    ``digits_split()`` (batches from ``ArrayDataset(..., seed=seed)``); deterministic in ``seed``."""
    (x, labels), _ = digits_split()
    data = ArrayDataset(x, labels, seed=seed)
    graphdef, params = nnx.split(DigitsClassifier(rngs=nnx.Rngs(seed)))
    tx = optax.adam(learning_rate)

    @jax.jit
    def update(params: Any, opt_state: Any, x: Array, labels: Array) -> tuple[Any, Any]:
        def loss(p: Any) -> Array:
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for step in range(steps):
        params, opt_state = update(params, opt_state, *data.batch(step, batch_size))
    return nnx.merge(graphdef, params)


@functools.cache
def _trained(seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(train_digits_classifier(seed))


def digits_classifier(seed: int = 0) -> DigitsClassifier:
    """``train_digits_classifier(seed)``, trained once per process (each call returns a fresh module
    sharing the cached, immutable weights)."""
    return nnx.merge(*_trained(seed))


def digits_frechet_distance(
    samples: ArrayLike, *, reference: ArrayLike | None = None, classifier: DigitsClassifier | None = None
) -> float:
    """``frechet_distance`` of ``classifier`` features (default ``digits_classifier()``) of ``samples``
    and of ``reference`` (default the held-out real digits of ``digits_split()``); images of shape
    ``(n, 8, 8, 1)``, ``(n, 8, 8)`` or ``(n, 64)`` in ``[−1, 1]`` (samples are not clipped)."""
    if reference is None:
        _, (reference, _) = digits_split()
    classifier = digits_classifier() if classifier is None else classifier
    feats = []
    for name, images in (("samples", samples), ("reference", reference)):
        images = np.asarray(images)
        if images.ndim < 2 or int(np.prod(images.shape[1:])) != 64:
            raise ValueError(f"{name} must be 8×8 digit images of shape (n, 8, 8, 1), got {images.shape}")
        feats.append(classifier.features(images))
    return frechet_distance(*feats)
