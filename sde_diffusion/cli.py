"""Command line: ``sde-diffusion demo`` (more commands arrive with training and likelihoods)."""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from .metrics import sliced_wasserstein
from .oracles import GaussianMixture
from .reverse import ReverseSDE
from .sample import ProbabilityFlow, ReverseDiffusion, sample
from .schedule import VP
from .simulate import simulate


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sample an 8-component 2-D Gaussian-mixture ring with its exact score under the VP SDE,
    by the reverse SDE and by the probability-flow ODE; write a picture and metrics."""

    out: Path = Path("demo_out")
    """Directory for demo.png and metrics.json."""
    n: int = 4000
    """Number of samples per sampler (and of fresh data samples to compare with)."""
    sde_steps: int = 500
    """Euler–Maruyama steps on the reverse SDE."""
    rtol: float = 1e-4
    """Relative (and absolute) tolerance of the adaptive PF-ODE solve (Tsit5)."""
    seed: int = 0


def demo(config: DemoConfig) -> dict:
    """Run the demo; returns the metrics it prints and writes."""
    if config.n < 2 or config.sde_steps < 1 or not config.rtol > 0:
        raise ValueError("need n ≥ 2, sde_steps ≥ 1 and rtol > 0")
    keys = jax.random.split(jax.random.key(config.seed), 6)
    data = GaussianMixture.ring(keys[0])
    sde = VP()
    score = partial(data.marginal_score, sde)
    fresh = data.sample(keys[1], config.n)
    noise_floor = sliced_wasserstein(data.sample(keys[2], config.n), fresh, keys[5])

    metrics: dict = {"sde": "VP", "n": config.n, "sw2_data_vs_data": float(noise_floor)}
    results = {}
    for name, method in [
        ("reverse_sde", ReverseDiffusion(config.sde_steps)),
        ("pf_ode", ProbabilityFlow(rtol=config.rtol, atol=config.rtol)),
    ]:
        start = time.perf_counter()
        x, info = sample(sde, score, keys[3], (config.n, 2), method=method)
        x.block_until_ready()
        sw2 = float(sliced_wasserstein(x, fresh, keys[5]))
        metrics[name] = {"sw2": sw2, "nfe": info.nfe, "seconds": time.perf_counter() - start}
        results[name] = np.asarray(x)
        print(f"{name:12s} SW2 to fresh data {sw2:.4f}  NFE {info.nfe:4d}  ({metrics[name]['seconds']:.1f} s)")
    print(f"{'data':12s} SW2 between two fresh data sets (noise floor) {float(noise_floor):.4f}")

    ts = np.linspace(sde.t0, sde.t1, 101)
    forward = simulate(sde, data.sample(keys[4], 12), keys[4], ts, dt0=0.005)
    reverse = simulate(ReverseSDE(sde, score), sde.prior.sample(keys[4], (12, 2)), keys[5], ts, dt0=0.005)
    config.out.mkdir(parents=True, exist_ok=True)
    _plot(config.out / "demo.png", np.asarray(fresh), results, np.asarray(forward), np.asarray(reverse), ts)
    (config.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {config.out / 'demo.png'} and {config.out / 'metrics.json'}")
    return metrics


def _plot(path: Path, data, results, forward, reverse, ts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for ax, paths, title in [
        (axes[0], forward, "forward SDE: data → noise (x₁ coordinate)"),
        (axes[1], reverse, "reverse SDE: noise → data (x₁ coordinate)"),
    ]:
        times = ts if paths is forward else ts[::-1]
        ax.plot(times, paths[:, :, 0], lw=0.8)
        ax.set(title=title, xlabel="t", ylabel="x₁")
    for ax, (name, x) in zip(axes[2:], results.items()):
        ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.3, label="data")
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, label=name.replace("_", " "))
        ax.set(title=f"{name.replace('_', ' ')} samples vs data", xlabel="x₁", ylabel="x₂", aspect="equal")
        ax.legend(markerscale=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMMANDS = {"demo": (DemoConfig, demo)}


def main() -> None:
    config = tyro.extras.subcommand_cli_from_dict(
        {name: config_type for name, (config_type, _) in COMMANDS.items()},
        description="sde_diffusion: continuous-time score-based diffusion in JAX",
    )
    run = next(command for config_type, command in COMMANDS.values() if isinstance(config, config_type))
    run(config)
