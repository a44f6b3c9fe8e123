"""Training benchmark: trainer overhead, quality after N steps on exact mixture data, digits.

1. **overhead**: per-step time of ``sd.train`` (EMA, gradient clipping, non-finite guard, data
   pipeline, logging) against a minimal hand-written ``jax.jit`` step of the same network and the
   same loss (ε-prediction DSM under VP, uniform t, Adam), both in steady state: the trainer's
   per-step time is the median of its logged windows after the first (which holds compilation);
   the hand-written loop is compiled first and then timed. Ratio 1.0 = no overhead.
2. **quality** on the 8-component 2-D mixture ring (``sd.gaussian_mixture``), whose score is exact:
   after N steps (one run, resumed between checkpoints, bit-identical to an uninterrupted run) the
   ε-space score error ``E_t E_{x_t} σ²‖s_θ − ∇log p_t‖²/d`` (t on 32 log-SNR-uniform points from
   σ/α = 0.002 to t1) and the sliced W2 of 20-NFE samples to exact samples (with its noise floor).
3. **digits**: the U-Net on the 8×8 digits: steps/s, the Fréchet distance of samples in the
   features of the library's own digits classifier (``sd.digits_frechet_distance``), next to that of
   real training digits, and a PNG grid of samples.

Usage: ``python benchmarks/training.py`` (several minutes on CPU), ``--quick`` (about a minute).
Outputs under ``--out``: ``training.csv`` (overhead), ``quality.csv`` and ``training.png``
(quality), ``digits.png``; ``--sections`` picks the parts to run.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sde_diffusion as sd
from sde_diffusion.cli import build_method, denoising_time, generate


def _config(steps: int, batch_size: int, **kw) -> sd.TrainConfig:
    return sd.TrainConfig(steps=steps, batch_size=batch_size, log_every=10**9, checkpoint_every=10**9, **kw)


def _hand_written_seconds_per_step(net: nnx.Module, sde, x: np.ndarray, batch_size: int, steps: int, lr: float) -> float:
    """The minimal loop: ``jax.jit`` over (params, opt state, key, batch); ε-prediction DSM, Adam."""
    graphdef, params = nnx.split(net)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key, x0):
        def loss(params):
            k_t, k_e = jax.random.split(key)
            t = jax.random.uniform(k_t, (x0.shape[0],), minval=sde.t0 + 1e-5 * (sde.t1 - sde.t0), maxval=sde.t1)
            eps = jax.random.normal(k_e, x0.shape)
            alpha, sigma = jax.vmap(sde.alpha)(t), jax.vmap(sde.sigma)(t)
            shape = (-1,) + (1,) * (x0.ndim - 1)
            xt = alpha.reshape(shape) * x0 + sigma.reshape(shape) * eps
            pred = nnx.merge(graphdef, params)(xt, jnp.log(sigma / alpha) / 4)
            return jnp.mean(jnp.sum(jnp.square(pred - eps).reshape(x0.shape[0], -1), axis=-1))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    key = jax.random.key(0)

    def run(n):
        nonlocal params, opt_state
        for i in range(n):
            batch = x[rng.integers(0, len(x), batch_size)]
            params, opt_state, value = step(params, opt_state, jax.random.fold_in(key, i), batch)
        value.block_until_ready()

    run(2)  # compile
    start = time.perf_counter()
    run(steps)
    return (time.perf_counter() - start) / steps


def _trainer_seconds_per_step(make_net, sde, x, batch_size: int, steps: int, lr: float) -> float:
    """Median over the trainer's own logging windows after the first (which holds compilation)."""
    objective = sd.DenoisingScoreMatching(weighting=sd.NoiseWeighting(), times=sd.UniformTimes())
    model = sd.Noise(sd.Network(make_net(), sde))
    config = sd.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=lr, warmup_steps=1,
                            log_every=max(steps // 6, 1), checkpoint_every=10**9)
    history = sd.train(model, objective, sde, x, config, progress=False).history
    return 1 / float(np.median([r["steps_per_s"] for r in history[1:]]))


def overhead(args) -> list[dict]:
    sde = sd.VP()
    mixture = sd.gaussian_mixture(20000, seed=0)
    images = sd.digits()[0]
    cases = [
        ("MLP-256×3, 2-D", lambda: sd.MLP(2, hidden=256, depth=3, rngs=nnx.Rngs(0)), mixture, 256),
        ("MLP-256×3, 2-D", lambda: sd.MLP(2, hidden=256, depth=3, rngs=nnx.Rngs(0)), mixture, 4096),
        ("U-Net, digits", lambda: sd.UNet(1, rngs=nnx.Rngs(0)), images, 128),
    ]
    rows = []
    for name, make_net, x, batch in cases[:1] if args.quick else cases:
        steps = args.overhead_steps if "MLP" in name else max(args.overhead_steps // 5, 20)
        ours = _trainer_seconds_per_step(make_net, sde, x, batch, steps, 1e-3)
        hand = _hand_written_seconds_per_step(make_net(), sde, x, batch, steps, 1e-3)
        rows.append(dict(network=name, batch=batch, steps=steps, trainer_ms=1e3 * ours, hand_written_ms=1e3 * hand,
                         ratio=ours / hand, steps_per_s=1 / ours))
        print(f"{name:16s} batch {batch:5d}: trainer {1e3 * ours:7.2f} ms/step ({1 / ours:6.0f} steps/s), "
              f"hand-written jit {1e3 * hand:7.2f} ms/step, ratio {ours / hand:.2f}", flush=True)
    return rows


def score_error(model, sde, oracle: sd.GaussianMixture, key, n: int = 2000) -> float:
    """``E_t E_{x_t} σ²‖s_θ − s*‖²/d`` over 32 log-SNR-uniform times from σ/α = 0.002 to t1."""
    lam_hi = float(sde.log_snr(denoising_time(sde)))
    ts = jax.vmap(sde.t_from_log_snr)(jnp.linspace(float(sde.log_snr(sde.t1)), lam_hi, 32))
    errors = []
    for i, t in enumerate(ts):
        x = oracle.marginal_sample(sde, t, jax.random.fold_in(key, i), n)
        diff = jax.vmap(lambda y: model.score(sde, t, y) - oracle.marginal_score(sde, t, y))(x)
        errors.append(float(sde.sigma2(t) * jnp.mean(jnp.sum(diff**2, axis=-1))) / oracle.dim)
    return float(np.mean(errors))


def quality(args) -> list[dict]:
    sde = sd.VP()
    oracle = sd.gaussian_mixture_oracle()
    x = sd.gaussian_mixture(20000, seed=0)
    sigma_data = float(x.std())
    model = sd.EDMPreconditioned(sd.Network(sd.MLP(2, hidden=128, depth=3, rngs=nnx.Rngs(0)), sde), sigma_data=sigma_data)
    objective = sd.DenoisingScoreMatching(weighting=sd.EDMWeighting(sigma_data=sigma_data), times=sd.LogNormalNoise())
    keys = jax.random.split(jax.random.key(args.seed), 4)
    exact = oracle.sample(keys[0], args.samples)
    floor = float(sd.sliced_wasserstein(oracle.sample(keys[1], args.samples), exact, keys[2]))
    rows = [dict(steps=0, score_error=score_error(model, sde, oracle, keys[3]), sw2=float("nan"), sw2_floor=floor, seconds=0.0)]
    checkpoints = Path(tempfile.mkdtemp(prefix="quality_checkpoints_"))
    elapsed = 0.0
    for steps in args.quality_steps:
        start = time.perf_counter()
        result = sd.train(model, objective, sde, x, _config(steps, 256, learning_rate=2e-3, warmup_steps=200),
                          checkpoint_dir=checkpoints, resume=True, progress=False)
        elapsed += time.perf_counter() - start
        samples, nfe = generate(sde, result.ema_model, keys[1], (args.samples, 2), build_method("dpm++3m", 19))
        rows.append(dict(steps=steps, score_error=score_error(result.ema_model, sde, oracle, keys[3]),
                         sw2=float(sd.sliced_wasserstein(samples, exact, keys[2])), sw2_floor=floor, seconds=elapsed))
        print(f"steps {steps:6d}: score error {rows[-1]['score_error']:.4f} (initial {rows[0]['score_error']:.3f}), "
              f"SW2 at {nfe} NFE {rows[-1]['sw2']:.4f} (floor {floor:.4f}), {elapsed:.0f} s", flush=True)
    shutil.rmtree(checkpoints)
    return rows


def digits(args) -> dict:
    sde = sd.VP()
    images = sd.digits()[0]
    train, _ = sd.digits_split()
    sigma_data = float(images.std())
    model = sd.EDMPreconditioned(sd.Network(sd.UNet(1, rngs=nnx.Rngs(0)), sde), sigma_data=sigma_data)
    objective = sd.DenoisingScoreMatching(weighting=sd.EDMWeighting(sigma_data=sigma_data), times=sd.LogNormalNoise())
    start = time.perf_counter()
    result = sd.train(model, objective, sde, train[0], _config(args.digits_steps, 128, learning_rate=1e-3, warmup_steps=200),
                      progress=not args.quick)
    seconds = time.perf_counter() - start
    samples, nfe = generate(sde, result.ema_model, jax.random.key(args.seed), (500, 8, 8, 1), build_method("dpm++3m", 19))
    samples = np.clip(np.asarray(samples), -1, 1)
    fd = sd.digits_frechet_distance(samples)
    fd_real = sd.digits_frechet_distance(train[0][:500])
    from sde_diffusion.training import save_samples_png

    save_samples_png(args.out / "digits.png", samples, title=f"U-Net, {args.digits_steps} steps, DPM-Solver++ 3M {nfe} NFE")
    print(f"digits: {args.digits_steps} steps in {seconds:.0f} s; Fréchet distance of 500 samples {fd:.1f} "
          f"(500 real training digits: {fd_real:.1f}); wrote {args.out / 'digits.png'}", flush=True)
    return dict(steps=args.digits_steps, seconds=seconds, frechet=fd, frechet_real=fd_real, nfe=nfe)


def plot(path: Path, quality_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in quality_rows if r["steps"] > 0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].loglog([r["steps"] for r in trained], [r["score_error"] for r in trained], "o-")
    axes[0].axhline(quality_rows[0]["score_error"], color="gray", ls="--", label="untrained")
    axes[0].set(title="score error against the exact mixture score", xlabel="training steps", ylabel="E σ²‖s_θ − s*‖² / d")
    axes[0].legend()
    axes[1].semilogx([r["steps"] for r in trained], [r["sw2"] for r in trained], "o-", label="samples (20 NFE)")
    axes[1].axhline(trained[0]["sw2_floor"], color="gray", ls="--", label="noise floor (two exact sets)")
    axes[1].set(title="sliced W2 to exact samples", xlabel="training steps", ylabel="SW2")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps everywhere, one overhead case (about a minute)")
    p.add_argument("--sections", nargs="+", choices=["overhead", "quality", "digits"], default=["overhead", "quality", "digits"])
    p.add_argument("--overhead-steps", type=int, default=None, help="timed steps per MLP case (default 2000; quick 200)")
    p.add_argument("--quality-steps", type=int, nargs="+", default=None, help="default 500 2000 8000; quick 200 600")
    p.add_argument("--digits-steps", type=int, default=None, help="default 4000; quick 100")
    p.add_argument("--samples", type=int, default=4000, help="samples for SW2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.overhead_steps = args.overhead_steps or (200 if args.quick else 2000)
    args.quality_steps = args.quality_steps or ([200, 600] if args.quick else [500, 2000, 8000])
    args.digits_steps = args.digits_steps or (100 if args.quick else 4000)
    if args.quick:
        args.samples = min(args.samples, 1000)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"devices: {jax.devices()}", flush=True)
    summary = {}
    if "overhead" in args.sections:
        summary["overhead"] = overhead(args)
        _write_csv(args.out / "training.csv", summary["overhead"])
    if "quality" in args.sections:
        summary["quality"] = quality(args)
        _write_csv(args.out / "quality.csv", summary["quality"])
        plot(args.out / "training.png", summary["quality"])
    if "digits" in args.sections:
        summary["digits"] = digits(args)
    print(f"wrote results under {args.out}", flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
