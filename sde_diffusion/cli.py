"""Command line: ``sde-diffusion demo | train | sample | likelihood``, one typed config per command (tyro).

Names on the command line (``--model.sde edm``) map to library objects in the tables below; the
library itself is typed (``sd.EDM()``, ``sd.DPMSolverPP(...)``), the names live only here.
A training run directory holds ``run.json`` (the ``ModelSpec`` and data statistics), orbax
checkpoints, ``log.jsonl`` and sample PNGs; ``sample`` rebuilds the model from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Annotated, Literal

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

from . import data as datasets
from . import losses, nets
from .grids import KarrasSigma, UniformLogSNR
from .metrics import sliced_wasserstein
from .multistep import DDIM, DPMSolverPP, UniPC
from .guidance import ClassifierFreeGuidance
from .parametrization import Denoiser, EDMPreconditioned, Network, Noise, Score, Velocity, with_label
from .predictor_corrector import PredictorCorrector
from .reverse import ProbabilityFlowODE
from .sample import ProbabilityFlow, ReverseDiffusion, sample
from .schedule import EDM, VE, VP, CosineVP, RectifiedFlow, SubVP
from .singlestep import EDMHeun
from .training import TrainConfig, restore_model, train

DataName = Literal["moons", "swiss_roll", "checkerboard", "rings", "gaussian_mixture", "digits"]
SDES = {"vp": VP, "subvp": SubVP, "ve": VE, "edm": EDM, "cosine": CosineVP, "rectified_flow": RectifiedFlow}
PREDICTIONS = {"noise": Noise, "denoiser": Denoiser, "score": Score, "velocity": Velocity}
TOYS = {
    "moons": datasets.moons,
    "swiss_roll": datasets.swiss_roll,
    "checkerboard": datasets.checkerboard,
    "rings": datasets.rings,
    "gaussian_mixture": datasets.gaussian_mixture,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to train: SDE, parametrization and network (saved to run.json to rebuild the model)."""

    sde: Literal["vp", "subvp", "ve", "edm", "cosine", "rectified_flow"] = "vp"
    parametrization: Literal["edm", "noise", "denoiser", "score", "velocity"] = "edm"
    """EDM preconditioning (c_skip, c_out, c_in, c_noise) or a plain prediction."""
    network: Literal["auto", "mlp", "unet"] = "auto"
    """auto: MLP for vectors, U-Net for images."""
    width: int = 128
    """MLP hidden width, or U-Net base channels."""
    depth: int = 3
    """MLP hidden layers (U-Net: ignored)."""
    num_classes: int = 0
    """Classes of a class-conditional network (0: unconditional); set by ``train --conditional``."""
    mixed_precision: bool = False
    """Compute in bfloat16 with float32 weights."""
    seed: int = 0


def build_sde(spec: ModelSpec):
    return SDES[spec.sde]()


def build_model(spec: ModelSpec, event_shape: tuple[int, ...], sigma_data: float):
    """The prediction (network wrapped by its parametrization) for ``spec`` on data of ``event_shape``."""
    sde = build_sde(spec)
    rngs = nnx.Rngs(spec.seed)
    dtype = jnp.bfloat16 if spec.mixed_precision else jnp.float32
    network = spec.network if spec.network != "auto" else ("mlp" if len(event_shape) == 1 else "unet")
    classes = spec.num_classes or None
    if network == "mlp":
        if len(event_shape) != 1:
            raise ValueError(f"the MLP takes vectors, the data have event shape {event_shape}: use --model.network unet")
        net = nets.MLP(event_shape[0], hidden=spec.width, depth=spec.depth, num_classes=classes, dtype=dtype, rngs=rngs)
    else:
        if len(event_shape) != 3:
            raise ValueError(f"the U-Net takes images (H, W, C), the data have event shape {event_shape}")
        net = nets.UNet(event_shape[-1], base=spec.width, num_classes=classes, dtype=dtype, rngs=rngs)
    fn = Network(net, sde)
    if spec.parametrization == "edm":
        return EDMPreconditioned(fn, sigma_data=sigma_data)
    return PREDICTIONS[spec.parametrization](fn)


def load_data(name: DataName | Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x, labels)``: a toy set (n points; the Gaussian mixture labelled by component), the 8×8
    digits (images in [−1, 1], labelled), a .npy array of shape (n, ...) or a .npz holding ``x``
    (and optionally integer ``labels``); ``labels`` is None for unlabelled data."""
    if isinstance(name, Path):
        if not name.exists():
            raise FileNotFoundError(f"data file {name} does not exist")
        if name.suffix == ".npz":
            arrays = np.load(name)
            if "x" not in arrays:
                raise ValueError(f"{name} must hold an array named x (and optionally labels)")
            return arrays["x"], arrays["labels"] if "labels" in arrays else None
        return np.load(name), None
    if name == "digits":
        return datasets.digits()
    if name == "gaussian_mixture":
        return datasets.gaussian_mixture(n, seed=seed, labels=True)
    return TOYS[name](n, seed=seed), None


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """Train a score model by denoising score matching; checkpoints and logs go to ``out``."""

    out: Path = Path("runs/moons")
    data: DataName | Path = "moons"
    """A built-in set or a .npy file of shape (n, ...)."""
    n_data: int = 20000
    """Number of points drawn from a 2-D toy set."""
    model: ModelSpec = ModelSpec()
    weighting: Literal["simple", "likelihood", "edm", "min_snr"] = "edm"
    """Loss weighting of the squared score error: σ², g², EDM, or min-SNR-5."""
    times: Literal["uniform", "log_snr", "log_normal"] = "log_normal"
    """Training time distribution: uniform t, uniform log-SNR (importance for g²), EDM log-normal σ."""
    train: TrainConfig = TrainConfig(steps=4000, batch_size=256, learning_rate=2e-3, warmup_steps=200)
    conditional: bool = False
    """Train a class-conditional model on the data's labels (digits, gaussian_mixture, .npz with
    labels), with label dropout for classifier-free guidance (``sample --class y --guidance w``)."""
    label_dropout: float = 0.1
    """Probability of training a labelled example as unconditional (the null class)."""
    resume: bool = True
    """Continue from the latest checkpoint in ``out`` if there is one."""
    sample_every: int = 0
    """Write a PNG of samples every this many steps (0: never)."""
    progress: bool = True


def _objective(command: TrainCommand, sigma_data: float, num_classes: int):
    weighting = {
        "simple": losses.NoiseWeighting(),
        "likelihood": losses.LikelihoodWeighting(),
        "edm": losses.EDMWeighting(sigma_data=sigma_data),
        "min_snr": losses.MinSNRWeighting(),
    }[command.weighting]
    times = {
        "uniform": losses.UniformTimes(),
        "log_snr": losses.LogSNRTimes(),
        "log_normal": losses.LogNormalNoise(),
    }[command.times]
    objective = losses.DenoisingScoreMatching(weighting=weighting, times=times)
    return losses.LabelDropout(objective, num_classes, command.label_dropout) if num_classes else objective


def train_command(command: TrainCommand):
    """Run ``train``; returns ``(model, TrainResult, run)`` where ``run`` is what run.json holds."""
    x, labels = load_data(command.data, command.n_data, command.model.seed)
    spec = command.model
    if command.conditional:
        if labels is None:
            raise ValueError(f"--conditional needs labelled data (digits, gaussian_mixture, .npz with labels), not {command.data}")
        spec = dataclasses.replace(spec, num_classes=int(np.max(labels)) + 1)
    elif spec.num_classes:
        raise ValueError("a class-conditional model (num_classes > 0) is trained with --conditional")
    dataset = datasets.as_dataset((x, labels) if spec.num_classes else x, seed=spec.seed)
    sigma_data = float(np.std(x))
    run = {
        "model": dataclasses.asdict(spec),
        "event_shape": list(x.shape[1:]),
        "sigma_data": sigma_data,
        "data": str(command.data),
    }
    command.out.mkdir(parents=True, exist_ok=True)
    run_file = command.out / "run.json"
    if command.resume and run_file.exists() and json.loads(run_file.read_text())["model"] != run["model"]:
        raise ValueError(f"{run_file} describes another model; use a fresh --out or --no-resume")
    run_file.write_text(json.dumps(run, indent=2))
    model = build_model(spec, x.shape[1:], sigma_data)
    sde = build_sde(spec)
    sample_fn = None
    if command.sample_every > 0:
        def sample_fn(ema_model, key):
            return generate(sde, ema_model, key, (256, *x.shape[1:]), build_method("dpm++3m", 19))[0]
    result = train(
        model,
        _objective(command, sigma_data, spec.num_classes),
        sde,
        dataset,
        dataclasses.replace(command.train, sample_every=command.sample_every),
        checkpoint_dir=command.out / "checkpoints",
        resume=command.resume,
        log_path=command.out / "log.jsonl",
        sample_fn=sample_fn,
        sample_dir=command.out / "samples",
        progress=command.progress,
    )
    return result, run


SIGMA_MIN = 0.002
"""Sampling stops at ``σ/α = SIGMA_MIN`` (EDM's σ_min) and then denoises: ``x0 = D(x, t_min)``."""


def denoising_time(sde) -> float:
    """The time where ``σ/α = SIGMA_MIN``, or ``t0`` if ``σ(t0)/α(t0)`` is already larger."""
    lam = -2 * math.log(SIGMA_MIN)
    return sde.t0 if lam >= float(sde.log_snr(sde.t0)) else float(sde.t_from_log_snr(lam))


def generate(sde, model, key, shape: tuple[int, ...], method):
    """Samples of the data: ``method`` from the prior down to ``denoising_time(sde)``, then one
    denoiser evaluation (counted in ``nfe``). Returns ``(x0, nfe)``."""
    t_end = denoising_time(sde)
    x, info = sample(sde, model, key, shape, method=method, t_end=t_end)
    return jax.vmap(model.denoiser, in_axes=(None, None, 0))(sde, t_end, x), info.nfe + 1


METHODS = ("dpm++3m", "dpm++2m", "unipc", "ddim", "heun", "euler_maruyama", "predictor_corrector", "pf_ode")


def build_method(name: str, steps: int):
    """A sampling method by name, with ``steps`` steps (the PF ODE is adaptive: rtol = atol = 1e-4).
    Exponential integrators step uniformly in log-SNR, EDM Heun on Karras' σ grid."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    return {
        "dpm++3m": lambda: DPMSolverPP(num_steps=steps, order=3, grid=UniformLogSNR()),
        "dpm++2m": lambda: DPMSolverPP(num_steps=steps, order=2, grid=UniformLogSNR()),
        "unipc": lambda: UniPC(num_steps=steps, order=3, grid=UniformLogSNR()),
        "ddim": lambda: DDIM(num_steps=steps, grid=UniformLogSNR()),
        "heun": lambda: EDMHeun(num_steps=steps, grid=KarrasSigma()),
        "euler_maruyama": lambda: ReverseDiffusion(num_steps=steps),
        "predictor_corrector": lambda: PredictorCorrector(num_steps=steps),
        "pf_ode": lambda: ProbabilityFlow(rtol=1e-4, atol=1e-4),
    }[name]()


@dataclasses.dataclass(frozen=True)
class SampleCommand:
    """Draw samples from a trained run (EMA weights by default); write a PNG or an NPZ."""

    run: Path = Path("runs/moons")
    """A directory written by ``sde-diffusion train``."""
    method: Literal["dpm++3m", "dpm++2m", "unipc", "ddim", "heun", "euler_maruyama", "predictor_corrector", "pf_ode"] = "dpm++3m"
    steps: int = 20
    n: int = 2000
    output: Path = Path("samples.png")
    """.png (scatter or image grid) or .npz (array ``samples``)."""
    ema: bool = True
    seed: int = 0
    label: Annotated[int | None, tyro.conf.arg(name="class")] = None
    """Class to generate, for a model trained with ``--conditional`` (default: unconditional)."""
    guidance: float = 1.0
    """Classifier-free guidance scale w with --class: D = D_∅ + w (D_y − D_∅); 1 is the plain conditional model."""
    guidance_interval: tuple[float, float] | None = None
    """Noise levels σ/α in (lo, hi] where guidance is on (default: everywhere)."""


def guided_model(model, num_classes: int, label: int | None, guidance: float, interval: tuple[float, float] | None):
    """``model`` for class ``label`` with classifier-free guidance ``guidance`` (``None``: the
    unconditional model of a class-conditional network, or ``model`` itself)."""
    if label is None:
        if guidance != 1.0 or interval is not None:
            raise ValueError("--guidance and --guidance-interval need --class")
        return with_label(model, None) if num_classes else model
    if not num_classes:
        raise ValueError("--class needs a model trained with --conditional")
    if not 0 <= label < num_classes:
        raise ValueError(f"--class must lie in [0, {num_classes - 1}], got {label}")
    conditional = with_label(model, label)
    if guidance == 1.0 and interval is None:
        return conditional
    return ClassifierFreeGuidance(conditional, with_label(model, None), guidance, interval)


def load_run(run_dir: Path, ema: bool = True):
    """``(sde, model)`` of a training run, with its trained (EMA) weights."""
    run_file = run_dir / "run.json"
    if not run_file.exists():
        raise FileNotFoundError(f"{run_file} not found: is {run_dir} a directory written by `sde-diffusion train`?")
    run = json.loads(run_file.read_text())
    spec = ModelSpec(**run["model"])
    template = build_model(spec, tuple(run["event_shape"]), run["sigma_data"])
    return build_sde(spec), restore_model(template, run_dir / "checkpoints", ema=ema)


def sample_command(command: SampleCommand) -> np.ndarray:
    sde, model = load_run(command.run, command.ema)
    if command.n < 1:
        raise ValueError(f"n must be ≥ 1, got {command.n}")
    if command.output.suffix not in (".png", ".npz"):
        raise ValueError(f"output must end in .png or .npz, got {command.output}")
    run = json.loads((command.run / "run.json").read_text())
    model = guided_model(model, run["model"].get("num_classes", 0), command.label, command.guidance, command.guidance_interval)
    start = time.perf_counter()
    x, nfe = generate(sde, model, jax.random.key(command.seed), (command.n, *run["event_shape"]), build_method(command.method, command.steps))
    x = np.asarray(x)
    passes = " (2 network passes each where guided)" if isinstance(model, ClassifierFreeGuidance) else ""
    print(f"{command.n} samples by {command.method} in {time.perf_counter() - start:.1f} s, NFE {nfe}{passes}")
    command.output.parent.mkdir(parents=True, exist_ok=True)
    if command.output.suffix == ".npz":
        np.savez(command.output, samples=x)
    else:
        from .training import save_samples_png

        guided = "" if command.label is None else f", class {command.label}, guidance {command.guidance:g}"
        save_samples_png(command.output, x, title=f"{command.method}, {nfe} NFE{guided}")
    print(f"wrote {command.output}")
    return x


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Train a small score model on a 2-D toy set (about a minute on 2 CPU cores), sample it with
    DPM-Solver++ (3M, 20 NFE), and compare with held-out data; write demo.png and metrics.json."""

    out: Path = Path("demo_out")
    data: Literal["moons", "swiss_roll", "checkerboard", "rings", "gaussian_mixture"] = "moons"
    steps: int = 5000
    """Training steps."""
    n: int = 8000
    """Samples drawn, and held-out points compared with."""
    sample_steps: int = 20
    """Model evaluations of the sampler (the last one denoises)."""
    seed: int = 0
    progress: bool = True


def demo(config: DemoConfig) -> dict:
    """Run the demo; returns the metrics it prints and writes."""
    if config.n < 2 or config.steps < 1 or config.sample_steps < 2:
        raise ValueError("need n ≥ 2, steps ≥ 1 and sample_steps ≥ 2")
    command = TrainCommand(
        out=config.out / "run",
        data=config.data,
        model=ModelSpec(seed=config.seed),
        train=TrainConfig(steps=config.steps, batch_size=256, learning_rate=2e-3, warmup_steps=min(200, config.steps // 5), checkpoint_every=max(config.steps // 2, 1)),
        resume=False,
        progress=config.progress,
    )
    shutil.rmtree(command.out, ignore_errors=True)  # the demo's own previous run: start afresh
    start = time.perf_counter()
    result, _ = train_command(command)
    train_seconds = time.perf_counter() - start
    sde, model = build_sde(command.model), result.ema_model
    keys = jax.random.split(jax.random.key(config.seed + 1), 4)
    held_out = TOYS[config.data](2 * config.n, seed=config.seed + 1)
    held_out, other = held_out[: config.n], held_out[config.n :]
    start = time.perf_counter()
    x, nfe = generate(sde, model, keys[0], (config.n, 2), build_method("dpm++3m", config.sample_steps - 1))
    x = np.asarray(x)
    sample_seconds = time.perf_counter() - start
    sw2 = float(sliced_wasserstein(x, held_out, keys[1]))
    floor = float(sliced_wasserstein(other, held_out, keys[1]))
    metrics = {
        "data": config.data,
        "train_steps": result.step,
        "train_seconds": train_seconds,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "sampler": "DPM-Solver++(3M), uniform log-SNR",
        "nfe": nfe,
        "sample_seconds": sample_seconds,
        "sw2_samples_vs_held_out": sw2,
        "sw2_data_vs_held_out": floor,
    }
    print(f"trained {result.step} steps in {train_seconds:.0f} s; sampled {config.n} points with {nfe} NFE in {sample_seconds:.1f} s")
    print(f"sliced W2 to held-out data: samples {sw2:.4f}, a second held-out set {floor:.4f} (noise floor)")
    paths = _flow_paths(sde, model, sde.prior.sample(keys[2], (24, 2)))
    config.out.mkdir(parents=True, exist_ok=True)
    _plot(config.out / "demo.png", held_out, x, np.asarray(paths), result.history, metrics)
    (config.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {config.out / 'demo.png'} and {config.out / 'metrics.json'}")
    return metrics


def _flow_paths(sde, model, x_start: jax.Array, num_times: int = 60) -> np.ndarray:
    """Probability-flow ODE trajectories from ``x_start`` at ``t1`` down to ``denoising_time``
    (Tsit5, rtol 1e-4), then one last point: the denoiser's ``E[x0 | x_t]`` there."""
    t_min = denoising_time(sde)
    flow = ProbabilityFlowODE(sde, lambda t, y: model.score(sde, t, y))
    span = sde.t1 - t_min
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda s, x, args: jax.vmap(flow.vector_field, in_axes=(None, 0))(s, x)),
        diffrax.Tsit5(),
        0.0,
        span,
        span / 100,
        x_start,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, span, num_times)),
        stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-4),
    )
    denoised = jax.vmap(model.denoiser, in_axes=(None, None, 0))(sde, t_min, solution.ys[-1])
    return np.concatenate([np.asarray(solution.ys), np.asarray(denoised)[None]])


def _plot(path: Path, data: np.ndarray, samples: np.ndarray, paths: np.ndarray, history: list[dict], metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6))
    lim = np.quantile(np.abs(data), 0.995) * 1.3
    axes[0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.4, color="C0")
    axes[0].set(title="held-out data")
    axes[1].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.4, color="C1")
    axes[1].set(title=f"samples: {metrics['sampler']}, {metrics['nfe']} NFE\nsliced W2 {metrics['sw2_samples_vs_held_out']:.3f} (floor {metrics['sw2_data_vs_held_out']:.3f})")
    axes[2].scatter(data[:, 0], data[:, 1], s=1, alpha=0.15, color="C0")
    for k in range(paths.shape[1]):
        axes[2].plot(paths[:, k, 0], paths[:, k, 1], lw=0.6, alpha=0.8)
        axes[2].scatter(paths[-1, k, 0], paths[-1, k, 1], s=12, color="k", zorder=3)
    axes[2].set(title="probability-flow ODE paths, noise → data (• = end)")
    for ax in axes[:3]:
        ax.set(xlabel="x₁", ylabel="x₂", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    steps = [h["step"] for h in history]
    axes[3].plot(steps, [h["loss"] for h in history])
    axes[3].set(title="training loss", xlabel="step", ylabel="loss (window mean)", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMMANDS = {
    "demo": (DemoConfig, demo),
    "train": (TrainCommand, train_command),
    "sample": (SampleCommand, sample_command),
}


def main() -> None:
    from .likelihood_cli import LikelihoodCommand, likelihood_command  # it builds on this module

    commands = {**COMMANDS, "likelihood": (LikelihoodCommand, likelihood_command)}
    config = tyro.extras.subcommand_cli_from_dict(
        {name: config_type for name, (config_type, _) in commands.items()},
        description="sde_diffusion: continuous-time score-based diffusion in JAX",
    )
    run = next(command for config_type, command in commands.values() if isinstance(config, config_type))
    run(config)
