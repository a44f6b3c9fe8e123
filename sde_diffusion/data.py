"""Data: toy 2-D sets, the 8×8 digits, and datasets that hand the trainer its batches.

Toy sets are ``(n, 2)`` float32 arrays of roughly zero mean and unit-order spread (each function
states its support), deterministic in ``seed``. ``digits()`` is scikit-learn's offline 8×8 digits in
``[−1, 1]``.

A dataset is any object with ``batch(step, batch_size)``, ``event_shape`` and ``num_examples``
(``Dataset``). ``batch`` returns ``x`` of shape ``(batch_size, *event_shape)`` (float32), or
``(x, labels)`` when the data carry labels, and depends only on the dataset's seed and ``step``,
so a resumed run sees exactly the batches of an uninterrupted one. ``as_dataset`` turns arrays,
``(x, labels)`` pairs, iterables and callables into one.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import equinox as eqx
import jax
import numpy as np
from sklearn import datasets as _sk

from .oracles import GaussianMixture

Batch = np.ndarray | tuple[np.ndarray, np.ndarray]


def _count(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int ``≥ minimum`` (TypeError for non-integers, ValueError below it)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


# -- toy 2-D sets ---------------------------------------------------------------------------


def moons(n: int, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """Two interleaved half circles (``sklearn.datasets.make_moons``, Gaussian ``noise``), centred
    and divided by 0.707 so that ``E‖x‖² ≈ 2`` (per-axis mean squares ≈ 1.5 and 0.5; support
    ≈ [−2.4, 2.4] × [−1.4, 1.4])."""
    x, _ = _sk.make_moons(_count(n, "n", 1), noise=noise, random_state=_count(seed, "seed", 0))
    return ((x - np.array([0.5, 0.25])) / 0.707).astype(np.float32)


def swiss_roll(n: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """The ``(x, z)`` projection of ``sklearn.datasets.make_swiss_roll`` (the spiral
    ``t (cos t, sin t)``, ``t ~ U[1.5π, 4.5π]``, Gaussian ``noise`` in those units), centred at its
    mean ``(2, 2/(3π))`` and divided by 6.8 so that ``E‖x‖² ≈ 2`` (support ≈ [−2, 2.3]²)."""
    x, _ = _sk.make_swiss_roll(_count(n, "n", 1), noise=noise, random_state=_count(seed, "seed", 0))
    return ((x[:, [0, 2]] - np.array([2.0, 2 / (3 * np.pi)])) / 6.8).astype(np.float32)


def checkerboard(n: int, seed: int = 0) -> np.ndarray:
    """Uniform on the 8 squares ``[i, i+1) × [j, j+1) − 2`` with ``i + j`` even of a 4×4 board on
    ``[−2, 2]²`` (mean 0, per-coordinate variance 4/3)."""
    rng = np.random.default_rng(_count(seed, "seed", 0))
    n = _count(n, "n", 1)
    i = rng.integers(0, 4, n)
    j = 2 * rng.integers(0, 2, n) + i % 2  # the column parity follows the row: i + j even
    corner = np.stack([i, j], axis=-1) - 2.0
    return (corner + rng.uniform(size=(n, 2))).astype(np.float32)


def rings(n: int, seed: int = 0, radii: tuple[float, ...] = (0.5, 1.0, 1.5), noise: float = 0.04) -> np.ndarray:
    """Concentric circles: ring ``k`` uniform in ``radii``, angle uniform, radius ``r_k + noise·N(0, 1)``
    (mean 0, per-coordinate mean square ``mean(r_k²)/2 + noise²/2``; 0.58 for the defaults)."""
    rng = np.random.default_rng(_count(seed, "seed", 0))
    n = _count(n, "n", 1)
    radii = np.asarray(radii, dtype=np.float64)
    if radii.ndim != 1 or radii.size < 1 or not np.all(radii > 0):
        raise ValueError(f"radii must be a non-empty sequence of positive numbers, got {radii}")
    r = radii[rng.integers(0, radii.size, n)] + noise * rng.standard_normal(n)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    return (r[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)).astype(np.float32)


def gaussian_mixture_oracle(n_components: int = 8, radius: float = 1.0) -> GaussianMixture:
    """The mixture that ``gaussian_mixture`` samples: ``GaussianMixture.ring(jax.random.key(0), ...)``
    (equal weights, means on a circle of ``radius``, per-axis std in [0.05, 0.15]). Its exact
    marginal score is the ground truth for training."""
    return GaussianMixture.ring(jax.random.key(0), _count(n_components, "n_components", 1), radius)


def gaussian_mixture(
    n: int, seed: int = 0, n_components: int = 8, radius: float = 1.0, *, labels: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact samples of ``gaussian_mixture_oracle(n_components, radius)`` drawn with
    ``jax.random.key(seed)`` (for ≥ 2 components: mean 0, per-coordinate variance ≈ radius²/2 + 0.01);
    with ``labels=True`` also the component of each sample (int32), the classes of the oracle's
    exact class-conditional ``oracle.select([k])``."""
    oracle = gaussian_mixture_oracle(n_components, radius)
    x, k = oracle.sample_with_components(jax.random.key(_count(seed, "seed", 0)), _count(n, "n", 1))
    x = np.asarray(x, dtype=np.float32)
    return (x, np.asarray(k, dtype=np.int32)) if labels else x


# -- 8×8 digits ------------------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits (``load_digits``, shipped with the package): images
    ``(1797, 8, 8, 1)`` float32 mapped from ``[0, 16]`` to ``[−1, 1]`` (``x/8 − 1``), labels int32."""
    data = _sk.load_digits()
    images = (data.images / 8.0 - 1.0).astype(np.float32)[..., None]
    return images, data.target.astype(np.int32)


def train_test_split(
    x: Any, labels: Any = None, *, test_fraction: float = 0.25, seed: int = 0
) -> tuple[Batch, Batch]:
    """Split examples (first axis) at random into ``(train, test)`` with ``round(test_fraction·n)``
    test examples; each part is ``x`` or ``(x, labels)`` like the input (and like ``batch``)."""
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError("x must have a leading example axis")
    n = x.shape[0]
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = round(test_fraction * n)
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction {test_fraction} of {n} examples leaves an empty part")
    order = np.random.default_rng(_count(seed, "seed", 0)).permutation(n)
    test, train = order[:n_test], order[n_test:]
    if labels is None:
        return x[train], x[test]
    labels = np.asarray(labels)
    if labels.shape[:1] != (n,):
        raise ValueError(f"labels have shape {labels.shape}, expected ({n},) to match x")
    return (x[train], labels[train]), (x[test], labels[test])


# -- datasets --------------------------------------------------------------------------------


class Dataset(Protocol):
    """What the trainer needs: ``batch(step, batch_size)`` (deterministic in the dataset's seed and
    ``step``), ``event_shape``, and ``num_examples`` (``None`` for streams)."""

    def batch(self, step: int, batch_size: int) -> Batch: ...

    @property
    def event_shape(self) -> tuple[int, ...]: ...

    @property
    def num_examples(self) -> int | None: ...


def _is_dataset(data: Any) -> bool:
    """Whether ``data`` has the ``Dataset`` members (looked up statically: reading a stream's
    ``event_shape`` would draw a batch)."""
    missing = object()
    return all(
        inspect.getattr_static(data, name, missing) is not missing
        for name in ("batch", "event_shape", "num_examples")
    )


def _check_examples(x: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate ``x`` of shape ``(n, *event)`` with ``n ≥ 1`` (real numeric, finite) and optional
    1-D integer ``labels`` of length ``n``; return ``x`` as float32 and the labels."""
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{what} must hold real numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{what} must have shape (n, *event_shape) with ndim ≥ 2, got shape {x.shape}")
    if x.shape[0] < 1:
        raise ValueError(f"{what} holds no examples (shape {x.shape})")
    with np.errstate(over="ignore"):  # overflow to ±inf is reported below
        x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what} has {int(bad.sum())} non-finite entries (NaN or ±inf as float32); the first is "
            f"{x[first]} at index {first}"
        )
    if labels is None:
        return x, None
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels of {what} must be integers, got dtype {labels.dtype}")
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels of {what} have shape {labels.shape}, expected {x.shape[:1]} (one per example)")
    return x, labels


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the examples in ``epoch``: a permutation drawn from ``(seed, epoch)``, cached
    and read-only (every batch of the epoch shares it)."""
    order = np.random.default_rng((seed, epoch)).permutation(n)
    order.flags.writeable = False
    return order


class ArrayDataset(eqx.Module):
    """Examples ``x`` of shape ``(n, *event_shape)``, optionally with integer ``labels``, seen in
    epochs: epoch ``e`` visits every example once, in a permutation drawn from ``(seed, e)``.

    Batch ``step`` holds positions ``step·B, …, step·B + B − 1`` of the concatenated epochs
    (position ``p`` is example ``perm_{p // n}[p mod n]``), so batches wrap across epoch boundaries
    and ``B > n`` is fine. ``x`` is stored as float32.
    """

    x: np.ndarray
    labels: np.ndarray | None
    seed: int = eqx.field(static=True)

    def __init__(self, x: Any, labels: Any = None, seed: int = 0):
        self.x, self.labels = _check_examples(x, labels, "x")
        self.seed = _count(seed, "seed", 0)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.x.shape[1:]

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    def batch(self, step: int, batch_size: int) -> Batch:
        """``x[idx]`` (or ``(x[idx], labels[idx])``) for the ``batch_size`` positions of ``step``."""
        n = self.num_examples
        positions = _count(step, "step", 0) * _count(batch_size, "batch_size", 1) + np.arange(batch_size)
        epochs, within = np.divmod(positions, n)
        idx = np.empty_like(positions)
        for e in np.unique(epochs):
            idx[epochs == e] = _permutation(self.seed, int(e), n)[within[epochs == e]]
        return self.x[idx] if self.labels is None else (self.x[idx], self.labels[idx])


class IteratorDataset:
    """A stream of batches: each item is ``x`` of shape ``(B, *event_shape)`` or ``(x, labels)``.

    ``source`` is an iterable of batches or a zero-argument callable returning a fresh iterator.
    ``batch(step, B)`` returns the stream's batch number ``step`` (0-based), checked: numeric,
    finite, leading size ``B``, the event shape of the first batch, labels 1-D integer of length
    ``B``. A step ahead of the stream skips the batches in between (a resumed run starts at its
    step). A step behind it replays the stream from the start when it can be replayed (a callable,
    or a re-iterable collection such as a list); for a one-shot iterator it is an error. Exact
    resume needs a source that yields the same batches every time it is replayed.

    Unlike ``ArrayDataset`` this object is stateful (it holds the stream position), so it is a plain
    class, not an equinox module.
    """

    def __init__(self, source: Iterable[Any] | Callable[[], Iterator[Any]]):
        if isinstance(source, Iterator):
            self._replay = None
        elif isinstance(source, Iterable):
            self._replay = lambda: iter(source)
        elif callable(source):
            self._replay = source
        else:
            raise TypeError(
                f"IteratorDataset needs an iterable of batches or a callable returning an iterator, "
                f"got {type(source).__name__}"
            )
        self._stream = iter(source) if self._replay is None else iter(self._replay())
        self._position = 0  # the step of the next batch of the stream
        self._pending: Any = None  # that batch, when event_shape has already drawn it
        self._event_shape: tuple[int, ...] | None = None

    @property
    def num_examples(self) -> None:
        return None

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The event shape of the first batch (drawing the next batch, checked and kept for ``batch``,
        when none has been seen)."""
        if self._event_shape is None:
            if self._pending is None:
                self._pending = self._next()
            self._check(self._pending, self._position, None)
        return self._event_shape

    def _next(self) -> Any:
        try:
            return next(self._stream)
        except StopIteration:
            raise ValueError(f"the data stream ended after {self._position} batches") from None

    def _check(self, item: Any, step: int, batch_size: int | None) -> Batch:
        x, labels = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        x, labels = _check_examples(x, labels, f"batch {step}")
        if batch_size is not None and x.shape[0] != batch_size:
            raise ValueError(f"batch {step} has {x.shape[0]} examples, expected batch_size = {batch_size}")
        if self._event_shape is None:
            self._event_shape = x.shape[1:]
        elif x.shape[1:] != self._event_shape:
            raise ValueError(
                f"batch {step} has event shape {x.shape[1:]}, but the first batch had {self._event_shape}"
            )
        return x if labels is None else (x, labels)

    def batch(self, step: int, batch_size: int) -> Batch:
        """Batch number ``step`` of the stream (see the class docstring for skipping and replay)."""
        step, batch_size = _count(step, "step", 0), _count(batch_size, "batch_size", 1)
        if step < self._position:
            if self._replay is None:
                raise ValueError(
                    f"step {step} is behind the stream (at step {self._position}) and a one-shot "
                    "iterator cannot be replayed; pass a callable returning a fresh iterator"
                )
            self._stream, self._position, self._pending = iter(self._replay()), 0, None
        while self._position <= step:
            item = self._next() if self._pending is None else self._pending
            self._pending = None
            self._position += 1
        return self._check(item, step, batch_size)


def as_dataset(data: Any, seed: int = 0) -> Dataset:
    """A ``Dataset`` from ``data``: a dataset is returned as is (``seed`` unused); a numpy or JAX
    array → ``ArrayDataset(data, seed=seed)``; a pair ``(x, labels)`` → ``ArrayDataset(x, labels,
    seed)``; any other iterable (a list of batches, a generator) or a callable returning an
    iterator → ``IteratorDataset``. Convert nested lists of numbers with ``np.asarray`` first."""
    if _is_dataset(data):
        return data
    if isinstance(data, np.ndarray | jax.Array):
        return ArrayDataset(data, seed=seed)
    if isinstance(data, tuple):
        if len(data) != 2:
            raise TypeError(
                f"a tuple is read as (x, labels), got {len(data)} items; pass a list or an iterator "
                "for a stream of batches"
            )
        return ArrayDataset(data[0], data[1], seed=seed)
    if isinstance(data, str | bytes):
        raise TypeError(f"cannot make a dataset of {type(data).__name__}")
    if isinstance(data, Iterable) or callable(data):
        return IteratorDataset(data)
    raise TypeError(
        f"cannot make a dataset of {type(data).__name__}: expected an array, (x, labels), a dataset "
        "object, an iterable of batches or a callable returning an iterator"
    )
