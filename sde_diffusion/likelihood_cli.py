"""``sde-diffusion likelihood``: log-likelihood and bits/dim of data under a trained run's PF ODE."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Literal, get_args

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .cli import DataName, load_data, load_run
from .likelihood import (
    AbstractTraceEstimator,
    ExactTrace,
    GaussianProbe,
    Hutchinson,
    RademacherProbe,
    bits_per_dim,
    dequantize,
    log_likelihood,
)

SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3}
PROBES = {"rademacher": RademacherProbe, "gaussian": GaussianProbe}
DIGITS_LEVELS = 17
"""``sd.digits()`` holds the levels ``k/8 − 1``, ``k = 0, …, 16``."""


@dataclasses.dataclass(frozen=True)
class LikelihoodCommand:
    """Mean log-likelihood (nats) and bits/dim of data under a trained run (PF ODE, EMA weights)."""

    run: Path = Path("runs/moons")
    """A directory written by ``sde-diffusion train``."""
    data: DataName | Path | None = None
    """A built-in set or a .npy file of shape (n, ...); default: the run's training data."""
    n: int = 1000
    """Examples: fresh points of a 2-D toy set (drawn with ``seed``), else the first n."""
    levels: int | None = None
    """Quantization levels in [−1, 1] of discrete data: dequantize and report discrete bits/dim
    (default: 17 for digits, none for other data)."""
    trace: Literal["exact", "hutchinson"] = "exact"
    """Divergence: exact trace (d JVPs per evaluation) or Hutchinson's estimator."""
    probes: int = 1
    """Hutchinson probes per example."""
    probe: Literal["rademacher", "gaussian"] = "rademacher"
    solver: Literal["tsit5", "dopri5", "dopri8", "bosh3"] = "tsit5"
    rtol: float = 1e-5
    atol: float = 1e-5
    batch_size: int = 256
    """Examples per solve (vmapped, in lockstep)."""
    ema: bool = True
    seed: int = 1
    """Seed of toy points (training used the model seed, 0 by default), dequantization and probes."""


def build_trace(command: LikelihoodCommand) -> AbstractTraceEstimator:
    """The trace estimator named by ``command``."""
    return ExactTrace() if command.trace == "exact" else Hutchinson(command.probes, PROBES[command.probe]())


def likelihood_command(command: LikelihoodCommand) -> dict:
    """Run the command; returns (and prints) the summary."""
    if command.n < 1 or command.batch_size < 1:
        raise ValueError(f"n must be ≥ 1 and batch_size ≥ 1, got n={command.n}, batch_size={command.batch_size}")
    sde, model = load_run(command.run, command.ema)
    name = command.data
    if name is None:
        saved = json.loads((command.run / "run.json").read_text())["data"]
        name = saved if saved in get_args(DataName) else Path(saved)
    levels = DIGITS_LEVELS if command.levels is None and name == "digits" else command.levels
    x = np.asarray(load_data(name, command.n, command.seed)[0], dtype=np.float32)[: command.n]
    if x.ndim < 2:
        raise ValueError(f"data must have shape (n, ...) with an event shape, got {x.shape}")
    trace = build_trace(command)
    quantize_key, probe_key = jax.random.split(jax.random.key(command.seed))
    if levels is not None:
        x = dequantize(x, quantize_key, levels)
    start = time.perf_counter()
    log_p, nfe = [], []
    size = min(command.batch_size, len(x))
    starts = range(0, len(x), size)
    for i, key in zip(starts, jax.random.split(probe_key, len(starts))):
        chunk = x[i : i + size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])  # one compiled shape
        values, info = log_likelihood(
            sde, model, padded, key, trace=trace, solver=SOLVERS[command.solver](), rtol=command.rtol, atol=command.atol
        )
        log_p.append(np.asarray(values)[: len(chunk)])
        nfe.append(np.asarray(info.nfe)[: len(chunk)])
    log_p, nfe = np.concatenate(log_p), np.concatenate(nfe)
    dims = math.prod(x.shape[1:])
    result = {
        "data": str(name),
        "n": len(x),
        "levels": levels,
        "trace": command.trace if command.trace == "exact" else f"hutchinson ({command.probes} {command.probe})",
        "t_start": info.t_start,
        "mean_log_p": float(np.mean(log_p)),
        "stderr_log_p": float(np.std(log_p) / math.sqrt(len(log_p))),
        "bits_per_dim": float(jnp.mean(bits_per_dim(log_p, dims, levels))),
        "nfe_mean": float(np.mean(nfe)),
        "nfe_max": int(np.max(nfe)),
        "seconds": time.perf_counter() - start,
    }
    what = "dequantized, discrete bound" if levels is not None else "continuous"
    print(
        f"{result['n']} examples of {result['data']} (d = {dims}), t_start = {result['t_start']:.3g}, "
        f"{result['trace']} trace, {command.solver} rtol {command.rtol:g}"
    )
    print(f"log p: {result['mean_log_p']:.3f} ± {result['stderr_log_p']:.3f} nats (mean ± standard error)")
    print(f"bits/dim ({what}): {result['bits_per_dim']:.4f}")
    print(f"NFE per example: mean {result['nfe_mean']:.0f}, max {result['nfe_max']}; {result['seconds']:.1f} s")
    return result
