"""Training: one jitted step, optax, EMA of the weights, orbax checkpoints, data parallel.

``train(model, objective, sde, data, config)`` minimises ``objective(model, sde, batch, key)`` over
the trainable leaves of ``model`` (an equinox pytree such as ``sd.Noise(sd.Network(net, sde))``):
the inexact arrays of ``nnx.Param`` variables inside every ``sd.Network``; everything else (SDE
fields, frozen ``nnx.Variable``s such as random Fourier frequencies) is held fixed.

One step (``jax.jit``, state buffers donated), with ``k`` the step index and ``key_k =
fold_in(fold_in(key(seed), restorations), k)``:

    ℓ, g = value_and_grad(objective)(θ),   θ ← θ + optax update(g),
    e ← d_k e + (1 − d_k) θ,   d_k = min(d, (1 + k)/(10 + k))   (EMA warm-up; d_k = d without it),

and if ``ℓ`` or ``‖g‖`` is not finite, ``θ``, the optimiser state and ``e`` stay unchanged (the step
is skipped and counted). After ``max_bad_steps`` consecutive skipped steps the latest checkpoint
is restored and training goes on with fresh keys (the restoration count enters ``key_k``); without
a checkpoint, or after ``max_restorations`` restorations, a ``RuntimeError`` stops the run. The host
does not wait for each step: it dispatches up to 32 steps ahead (preparing the next batch while a
step computes) and reads their metrics at the next log, checkpoint, sample or 32nd step, in order,
so a bad streak is acted on there and the steps dispatched after it are dropped.

The default optimiser is Adam (AdamW when ``weight_decay > 0``) after clipping the global gradient
norm to ``grad_clip``, with learning rate ``η_n = η min(1, (n + 1)/W)`` at update ``n``: a linear
warm-up over ``W = warmup_steps`` updates, then constant (the usual choice with an EMA of the
weights; a constant tail also keeps the schedule independent of ``steps``, so a run can be
extended by resuming with more steps). It is built with ``optax.inject_hyperparams``, which is how
the logged learning rate is read; a custom ``optimizer`` built that way is logged the same way.

Checkpoints (orbax ``CheckpointManager``, atomic, the last ``keep_checkpoints`` kept) hold the
parameters, optimiser state, EMA, step, counters and the config; the batch of step ``k`` is
``data.batch(k, batch_size)`` and its key ``key_k``, so a resumed run is bit-identical to an
uninterrupted one. Ctrl-C (SIGINT) finishes the current step, saves it and re-raises
``KeyboardInterrupt``.

Data parallel: a 1-D ``jax.sharding.Mesh`` over ``devices`` (default ``jax.devices()``) with axis
``"data"``; each batch is split along its first axis, parameters, optimiser state and EMA are
replicated, and XLA inserts the gradient all-reduce into the same jitted step.

Multi-process (several hosts, or several processes on one host): start every process with

    jax.distributed.initialize(coordinator_address="host0:1234", num_processes=P, process_id=i)

(``jax.distributed.initialize()`` without arguments on SLURM / Cloud TPU), then call ``train``
with the same arguments in each, ``checkpoint_dir`` on a file system all processes share. Every
process computes the global batch ``data.batch(k, batch_size)`` and contributes the rows held by
its own devices (``jax.make_array_from_process_local_data``); only process 0 writes the metrics
log and sample images and shows the progress bar; orbax coordinates the checkpoint writes.

Mixed precision lives in the network (compute dtype bfloat16, ``param_dtype`` float32;
``sd.Network`` casts outputs to the dtype of ``x``); parameters stay float32 and the loss is
differentiated in at least float32.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PyTree
from tqdm import tqdm

from .parametrization import Network
from .sde import AbstractSDE

Objective = Callable[[PyTree, AbstractSDE, Any, Array], Array]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of ``train`` (also the ``sde-diffusion train`` command line options)."""

    steps: int
    """Number of optimisation steps; a resumed run continues up to this step."""
    batch_size: int = 256
    """Global batch size (split over all devices; must be divisible by their number)."""
    learning_rate: float = 1e-3
    """Peak learning rate η of the default optimiser."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up: η min(1, (n + 1)/warmup_steps) at update n, then constant (0: none)."""
    weight_decay: float = 0.0
    """Decoupled weight decay: AdamW when > 0, else Adam."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None or 0: no clipping)."""
    ema_decay: float = 0.999
    """EMA decay d of the weights, in [0, 1): e ← d e + (1 − d) θ."""
    ema_warmup: bool = True
    """Use d_k = min(d, (1 + k)/(10 + k)) at step k, so early EMA weights follow the fast-moving parameters."""
    seed: int = 0
    """Seed of the step keys, the data order and the sample keys."""
    log_every: int = 50
    """Log mean loss, gradient norm, learning rate and speed every this many steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Keep at most this many checkpoints (the latest ones)."""
    max_bad_steps: int = 5
    """Restore the latest checkpoint after this many consecutive non-finite steps."""
    max_restorations: int = 3
    """Give up (RuntimeError) after this many restorations."""
    sample_every: int = 0
    """Write a PNG of sample_fn(ema_model, key) every this many steps (0: never)."""

    def __post_init__(self):
        def check_int(name: str, minimum: int):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be ≥ {minimum}, got {value}")

        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
            check_int(name, 1)
        for name in ("warmup_steps", "seed", "max_restorations", "sample_every"):
            check_int(name, 0)
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and ≥ 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip must be None or finite and ≥ 0 (0 disables), got {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train`` returns."""

    model: PyTree
    """The trained model (its parameters after the last step)."""
    ema_model: PyTree
    """The model with the EMA parameters (usually the better sampler)."""
    step: int
    """Steps completed (skipped ones included)."""
    num_skipped: int
    """Steps skipped because the loss or the gradient was not finite."""
    num_restored: int
    """Restorations of the latest checkpoint after ``max_bad_steps`` consecutive skipped steps."""
    history: list[dict[str, Any]]
    """The logged records (see ``train``)."""


def default_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Clip the global norm to ``grad_clip``, then Adam (AdamW when ``weight_decay > 0``) with the
    warm-up-then-constant learning rate, injected so that the state carries it."""
    peak, warmup = config.learning_rate, config.warmup_steps

    def schedule(count):
        return peak * jnp.minimum(1.0, (count + 1) / max(warmup, 1))

    if config.weight_decay > 0:
        adam = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=config.weight_decay)
    else:
        adam = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    if config.grad_clip:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)
    return adam


def _trainable_spec(model: PyTree) -> PyTree:
    """The filter spec of ``model``: True at the inexact ``nnx.Param`` values inside each ``Network``."""

    def spec(node):
        if not isinstance(node, Network):
            return False
        params = jax.tree.map(
            lambda v: isinstance(v, nnx.Param) and eqx.is_inexact_array(v.get_value()),
            node.state,
            is_leaf=lambda v: isinstance(v, nnx.Variable),
        )
        return eqx.tree_at(lambda n: n.state, jax.tree.map(lambda _: False, node), params)

    return jax.tree.map(spec, model, is_leaf=lambda x: isinstance(x, Network))


def _split(model: PyTree) -> tuple[PyTree, PyTree]:
    """``(trainable, rest)`` with ``eqx.combine(trainable, rest) == model``."""
    params, rest = eqx.partition(model, _trainable_spec(model))
    if not jax.tree.leaves(params):
        raise ValueError(
            "the model has no trainable parameters: train acts on the nnx.Param arrays of the flax "
            "networks wrapped in sd.Network (e.g. sd.Noise(sd.Network(net, sde)))"
        )
    return params, rest


class _State(NamedTuple):
    params: PyTree
    opt_state: PyTree
    ema: PyTree


# -- checkpoints -----------------------------------------------------------------------------


def _signature(tree: PyTree) -> list[list]:
    """``[path, shape, dtype]`` of every leaf, as JSON."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[jax.tree_util.keystr(path), list(np.shape(x)), str(jnp.result_type(x))] for path, x in leaves]


def _check_signature(saved: list[list], expected: list[list], what: str, where: str) -> None:
    if saved == expected:
        return
    hint = "the model architecture" if what != "opt_state" else "the optimiser (or its settings)"
    if len(saved) != len(expected):
        detail = f"{len(saved)} arrays saved, {len(expected)} expected"
    else:
        s, e = next((s, e) for s, e in zip(saved, expected) if s != e)
        detail = f"saved {s[0]} {tuple(s[1])} {s[2]}, expected {e[0]} {tuple(e[1])} {e[2]}"
    raise ValueError(f"checkpoint {where} does not match this run's {what} ({detail}); did {hint} change?")


class _Checkpoints:
    """An orbax ``CheckpointManager`` of ``params``, ``opt_state``, ``ema`` (lists of arrays) and
    ``meta`` (JSON: step, counters, config, the signature of every array)."""

    def __init__(self, directory: str | os.PathLike, keep: int | None = None, create: bool = True):
        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: _State, meta: dict[str, Any]) -> None:
        meta = dict(meta, step=step, signature={k: _signature(v) for k, v in state._asdict().items()})
        items = {k: ocp.args.StandardSave(jax.tree.leaves(v)) for k, v in state._asdict().items()}
        self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))

    def meta(self, step: int) -> dict[str, Any]:
        self.manager.wait_until_finished()
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, template: dict[str, PyTree]) -> tuple[dict[str, PyTree], dict[str, Any]]:
        """The items named in ``template`` (restored with its structure, shapes, dtypes and
        shardings, after checking the saved signatures) and the meta of ``step``."""
        meta = self.meta(step)
        where = f"{self.directory} (step {step})"
        for name, tree in template.items():
            _check_signature(meta["signature"][name], _signature(tree), name, where)
        abstract = {
            name: ocp.args.StandardRestore(
                [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in jax.tree.leaves(tree)]
            )
            for name, tree in template.items()
        }
        restored = self.manager.restore(step, args=ocp.args.Composite(**abstract))
        trees = {
            name: jax.tree.unflatten(jax.tree.structure(tree), restored[name]) for name, tree in template.items()
        }
        return trees, meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_model(
    template_model: PyTree, checkpoint_dir: str | os.PathLike, ema: bool = True, step: int | None = None
) -> PyTree:
    """``template_model`` (same architecture as the trained one) with the parameters of a ``train``
    checkpoint: the EMA parameters when ``ema``, else the raw ones; the latest checkpoint unless
    ``step`` is given. A different architecture is a ``ValueError``."""
    params, rest = _split(template_model)
    name = "ema" if ema else "params"
    checkpoints = _Checkpoints(checkpoint_dir, create=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
        restored, _ = checkpoints.restore(step, {name: params})
    finally:
        checkpoints.close()
    return eqx.combine(restored[name], rest)


# -- logging and samples -------------------------------------------------------------------


class _MetricsLog:
    """Appends records to ``path``: CSV when it ends in ``.csv``, else JSON lines."""

    fields = ("step", "loss", "grad_norm", "learning_rate", "steps_per_s", "skipped")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.csv = self.path.suffix.lower() == ".csv"
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="" if self.csv else None)
        if self.csv:
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields)
            if new:
                self.writer.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        if self.csv:
            self.writer.writerow({k: "" if record[k] is None else record[k] for k in self.fields})
        else:
            self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _check_plottable(event_shape: tuple[int, ...]) -> None:
    if not (tuple(event_shape) == (2,) or (len(event_shape) == 3 and event_shape[-1] in (1, 3))):
        raise ValueError(
            f"sample images need event shape (2,) (scatter plot) or (H, W, C) with C in {{1, 3}}, got {event_shape}"
        )


def tile_images(images: Any, columns: int | None = None, fill: float = 1.0) -> np.ndarray:
    """Images ``(n, H, W, C)`` tiled row by row into one ``(rows (H + 1) + 1, columns (W + 1) + 1, C)``
    array with 1-pixel gaps of ``fill`` (``columns`` default: ``⌈√n⌉``)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must have shape (n, H, W, C) with n ≥ 1, got {images.shape}")
    n, h, w, c = images.shape
    columns = math.ceil(math.sqrt(n)) if columns is None else columns
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), fill, dtype=np.float32)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        grid[1 + r * (h + 1) : (r + 1) * (h + 1), 1 + q * (w + 1) : (q + 1) * (w + 1)] = image
    return grid


def save_samples_png(path: str | os.PathLike, samples: Any, title: str = "") -> None:
    """A PNG of ``samples``: a scatter plot for shape ``(n, 2)``, a grid of at most 64 images
    (min–max scaled to [0, 1]) for ``(n, H, W, C)`` with ``C ∈ {1, 3}``."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    samples = np.asarray(samples, dtype=np.float32)
    _check_plottable(samples.shape[1:])
    if samples.shape[1:] == (2,):
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
    else:
        images = samples[:64]
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        lo, hi = images.min(), images.max()
        grid = tile_images((images - lo) / (hi - lo) if hi > lo else np.zeros_like(images), cols)
        fig = Figure(figsize=(cols * 0.8 + 0.4, rows * 0.8 + 0.4))
        ax = fig.subplots()
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None, vmin=0, vmax=1)
        ax.axis("off")
    if title:
        ax.set_title(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# -- the training loop -----------------------------------------------------------------------


def _learning_rate(opt_state: PyTree) -> Array | None:
    """The learning rate of the latest update, when the optimiser injects it (``inject_hyperparams``)."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "hyperparams")):
        if isinstance(getattr(node, "hyperparams", None), dict) and "learning_rate" in node.hyperparams:
            return node.hyperparams["learning_rate"]
    return None


def _global_batch(data: Any, step: int, batch_size: int, sharding: NamedSharding) -> PyTree:
    """Batch ``step`` as global arrays split along their first axis; each process contributes the
    rows its devices hold."""
    batch = data.batch(step, batch_size)

    def put(leaf):
        leaf = np.asarray(leaf)
        leaf = leaf.astype(jax.dtypes.canonicalize_dtype(leaf.dtype), copy=False)
        if leaf.shape[:1] != (batch_size,):
            raise ValueError(f"data.batch({step}, {batch_size}) gave an array of shape {leaf.shape}")
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        rows = [index[0] for index in sharding.addressable_devices_indices_map(leaf.shape).values()]
        start = min(r.start or 0 for r in rows)
        stop = max(batch_size if r.stop is None else r.stop for r in rows)
        return jax.make_array_from_process_local_data(sharding, leaf[start:stop], leaf.shape)

    return jax.tree.map(put, batch)


class _Interrupt:
    """While active (main thread only), the first SIGINT sets ``requested`` instead of raising, so
    the loop stops at the end of a step with a consistent state; a second one raises at once."""

    def __init__(self):
        self.requested = False
        self.installed = False
        self.previous: Any = signal.default_int_handler

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


def _make_step(objective: Objective, optimizer: optax.GradientTransformation, static: PyTree, config: TrainConfig):
    """The jitted step ``(state, frozen, root_key, restorations, step, batch) -> (state, metrics)``."""

    def step_fn(state: _State, frozen, root_key, restorations, step, batch):
        rest, sde = eqx.combine(frozen, static)
        key = jax.random.fold_in(jax.random.fold_in(root_key, restorations), step)

        def loss_fn(params):
            loss = jnp.asarray(objective(eqx.combine(params, rest), sde, batch, key))
            return loss.astype(jnp.promote_types(loss.dtype, jnp.float32))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.asarray(config.ema_decay, jnp.float32)
        if config.ema_warmup:
            decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), state.ema, params)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), _State(params, opt_state, ema), state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok}
        lr = _learning_rate(opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
        return new, metrics

    return step_fn


_MAX_PENDING = 32
"""Steps the host may dispatch before reading their metrics (non-finite guard, progress, log)."""


class _Window:
    """Metrics of the steps since the last log record."""

    def __init__(self):
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.steps, self.skipped, self.learning_rate = 0, 0, None
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, Any]) -> None:
        self.steps += 1
        if not metrics["ok"]:
            self.skipped += 1
            return
        self.losses.append(float(metrics["loss"]))
        self.grad_norms.append(float(metrics["grad_norm"]))
        if "learning_rate" in metrics:
            self.learning_rate = float(metrics["learning_rate"])

    def record(self, step: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start
        return {
            "step": step,
            "loss": float(np.mean(self.losses)) if self.losses else None,
            "grad_norm": float(np.mean(self.grad_norms)) if self.grad_norms else None,
            "learning_rate": self.learning_rate,
            "steps_per_s": self.steps / elapsed if elapsed > 0 else None,
            "skipped": self.skipped,
        }


def train(
    model: PyTree,
    objective: Objective,
    sde: AbstractSDE,
    data: Any,
    config: TrainConfig,
    *,
    optimizer: optax.GradientTransformation | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    log_path: str | os.PathLike | None = None,
    sample_fn: Callable[[PyTree, Array], Any] | None = None,
    sample_dir: str | os.PathLike | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps of ``objective(model, sde, batch, key)`` on
    ``data`` (anything ``sd.as_dataset`` accepts; batch ``k`` is ``data.batch(k, batch_size)``).

    ``optimizer``: an optax transformation (default ``default_optimizer(config)``).
    ``checkpoint_dir``: save there every ``checkpoint_every`` steps, at the end and on Ctrl-C; with
    ``resume`` continue from its latest checkpoint (a directory holding checkpoints with
    ``resume=False`` is an error, so nothing is overwritten). ``log_path``: one record per
    ``log_every`` steps (and at the end) with ``step``, ``loss`` and ``grad_norm`` (means over the
    finite steps of the window), ``learning_rate`` (of the latest update; None when the optimiser
    does not inject it), ``steps_per_s`` and ``skipped`` (skipped steps in the window), as JSON
    lines or CSV (``.csv``); the same records are in ``TrainResult.history``. ``sample_fn(ema_model,
    key)``: with ``sample_every > 0``, its samples are drawn every ``sample_every`` steps and
    plotted to ``sample_dir/samples_<step>.png``. ``devices``: the data-parallel devices (default
    ``jax.devices()``, all processes). ``progress``: a tqdm bar with the loss and steps/s.
    """
    from .data import as_dataset

    data = as_dataset(data, config.seed)
    devices = list(jax.devices() if devices is None else devices)
    if config.batch_size % len(devices):
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of devices ({len(devices)})")
    if config.sample_every:
        if sample_fn is None or sample_dir is None:
            raise ValueError("sample_every > 0 needs sample_fn and sample_dir")
        _check_plottable(data.event_shape)
    main = jax.process_index() == 0
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    optimizer = default_optimizer(config) if optimizer is None else optimizer

    params, rest = _split(model)
    frozen, static = eqx.partition((rest, sde), eqx.is_array)
    frozen = jax.device_put(frozen, replicated)
    rest = eqx.combine(frozen, static)[0]
    state = jax.jit(
        lambda p: _State(p, optimizer.init(p), jax.tree.map(jnp.copy, p)), out_shardings=replicated
    )(jax.device_put(params, replicated))
    train_root, sample_root = jax.random.split(jax.random.key(config.seed))
    step_fn = jax.jit(_make_step(objective, optimizer, static, config), donate_argnums=0, out_shardings=replicated)

    step, num_skipped, num_restored, saved_step, consecutive_bad = 0, 0, 0, None, 0
    history: list[dict[str, Any]] = []
    checkpoints = log = bar = None
    pending: list[dict[str, Array]] = []  # metrics of dispatched steps not yet read

    def save():
        nonlocal saved_step
        if checkpoints is not None and saved_step != step:
            meta = {"num_skipped": num_skipped, "num_restored": num_restored, "config": dataclasses.asdict(config)}
            checkpoints.save(step, state, meta)
            saved_step = step

    try:
        if checkpoint_dir is not None:
            checkpoints = _Checkpoints(checkpoint_dir, config.keep_checkpoints)
            if (latest := checkpoints.latest_step()) is not None:
                if not resume:
                    raise ValueError(
                        f"{checkpoints.directory} already holds checkpoints (latest step {latest}); "
                        "pass resume=True to continue from them or choose an empty directory"
                    )
                trees, meta = checkpoints.restore(latest, state._asdict())
                state, step, saved_step = _State(**trees), latest, latest
                num_skipped, num_restored = meta["num_skipped"], meta["num_restored"]
        log = _MetricsLog(log_path) if log_path is not None and main else None
        bar = tqdm(total=config.steps, initial=step, disable=not (progress and main), desc="train", dynamic_ncols=True)
        window = _Window()

        def settle() -> bool:
            """Read the pending metrics in step order (one device sync): count, log, and restore
            the latest checkpoint after a bad streak (the steps dispatched after it are dropped).
            Returns whether it restored."""
            nonlocal state, step, saved_step, num_skipped, num_restored, consecutive_bad, window
            first = step - len(pending) + 1
            values = jax.device_get(pending)
            pending.clear()
            for at, metrics in enumerate(values, start=first):
                bar.update(1)
                window.add(metrics)
                consecutive_bad = 0 if metrics["ok"] else consecutive_bad + 1
                num_skipped += not metrics["ok"]
                if consecutive_bad >= config.max_bad_steps:
                    latest = None if checkpoints is None else checkpoints.latest_step()
                    if latest is None:
                        raise RuntimeError(
                            f"{consecutive_bad} consecutive steps with a non-finite loss or gradient (up to "
                            f"step {at}) and no checkpoint to restore; lower the learning rate, clip "
                            "gradients or check the data and objective"
                        )
                    if num_restored >= config.max_restorations:
                        raise RuntimeError(
                            f"{consecutive_bad} consecutive non-finite steps (up to step {at}) after "
                            f"{num_restored} restorations of the latest checkpoint: giving up"
                        )
                    trees, _ = checkpoints.restore(latest, state._asdict())
                    state, step, saved_step = _State(**trees), latest, latest
                    num_restored, consecutive_bad = num_restored + 1, 0
                    warnings.warn(
                        f"{config.max_bad_steps} consecutive non-finite steps: restored the checkpoint of "
                        f"step {latest} (restoration {num_restored})",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    bar.n, window = step, _Window()
                    return True
                if at % config.log_every == 0 or at == config.steps:
                    record = window.record(at)
                    history.append(record)
                    if log is not None:
                        log.write(record)
                    if record["loss"] is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", steps_per_s=f"{record['steps_per_s']:.1f}")
                    window = _Window()
            return False

        with _Interrupt() as interrupt:
            while step < config.steps:
                batch = _global_batch(data, step, config.batch_size, batch_sharding)
                state, metrics = step_fn(state, frozen, train_root, np.int32(num_restored), np.int32(step), batch)
                step += 1
                pending.append(metrics)
                sampling = config.sample_every and step % config.sample_every == 0
                checkpointing = step % config.checkpoint_every == 0
                if not (
                    checkpointing or sampling or interrupt.requested or step == config.steps
                    or step % config.log_every == 0 or len(pending) >= _MAX_PENDING
                ):
                    continue  # the host runs ahead: the next batch is prepared while this step computes
                if settle():
                    continue
                if checkpointing:
                    save()
                if sampling:
                    samples = sample_fn(eqx.combine(state.ema, rest), jax.random.fold_in(sample_root, step))
                    if isinstance(samples, jax.Array) and not samples.is_fully_addressable:
                        samples = multihost_utils.process_allgather(samples, tiled=True)
                    if main:
                        save_samples_png(Path(sample_dir) / f"samples_{step:07d}.png", samples, f"step {step}")
                if interrupt.requested:
                    raise KeyboardInterrupt
            save()
    except KeyboardInterrupt:
        if not any(x.is_deleted() for x in jax.tree.leaves(state)):
            num_skipped += sum(not m["ok"] for m in jax.device_get(pending))
            save()
        raise
    finally:
        for resource in (bar, log, checkpoints):
            if resource is not None:
                resource.close()
    return TrainResult(
        eqx.combine(state.params, rest), eqx.combine(state.ema, rest), step, num_skipped, num_restored, history
    )
