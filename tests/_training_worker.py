"""Shared pieces of tests/test_training.py, and its subprocess worker.

``python tests/_training_worker.py parallel OUT`` (run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``)
trains on 4 devices and writes the parameters and EMA parameters to ``OUT``;
``python tests/_training_worker.py process ID COUNT PORT OUT CKPT`` is one of ``COUNT`` processes of a
``jax.distributed`` run that writes the trained parameters to ``OUT`` (process 0).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sde_diffusion as sd


class TinyNet(nnx.Module):
    """``y = W2 silu(W1 [x, sin(c f)]) + b2`` with frozen frequencies ``f`` (a plain nnx.Variable)."""

    def __init__(self, dim: int = 2, hidden: int = 32, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.freq = nnx.Variable(jnp.array([1.0, 3.0]))
        self.l1 = nnx.Linear(dim + 2, hidden, dtype=dtype, rngs=rngs)
        self.l2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, c):
        h = jnp.concatenate([x, jnp.sin(c[:, None] * self.freq[...])], axis=-1)
        return self.l2(jax.nn.silu(self.l1(h)))


def make_model(sde=None, seed: int = 0, hidden: int = 32, dtype=jnp.float32):
    sde = sd.VP() if sde is None else sde
    return sd.Noise(sd.Network(TinyNet(hidden=hidden, rngs=nnx.Rngs(seed), dtype=dtype), sde))


def dsm(model, sde, batch, key):
    """ε-prediction DSM: t ~ U(10⁻³, t1), x_t = α x0 + σ ε, mean ‖ε̂(t, x_t) − ε‖²."""
    x0 = batch[0] if isinstance(batch, tuple) else batch
    kt, ke = jax.random.split(key)
    t = jax.random.uniform(kt, x0.shape[:1], minval=1e-3, maxval=sde.t1)
    eps = jax.random.normal(ke, x0.shape)
    alpha, sigma = jax.vmap(sde.alpha)(t), jax.vmap(sde.sigma)(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * eps
    return jnp.mean(jnp.sum((jax.vmap(model.fn)(t, x_t) - eps) ** 2, axis=-1))


def gmm_data(n: int = 512, seed: int = 0):
    return sd.ArrayDataset(sd.gaussian_mixture(n, seed=seed), seed=seed)


def params_of(model) -> list[np.ndarray]:
    """The nnx.Param arrays of the model's network, in a fixed order."""
    return [np.asarray(x) for x in jax.tree.leaves(nnx.filter_state(model.fn.state, nnx.Param))]


CONFIG = dict(steps=6, batch_size=32, learning_rate=1e-2, warmup_steps=2, log_every=3, checkpoint_every=3)


def _parallel(out: str) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    result = sd.train(make_model(), dsm, sd.VP(), gmm_data(), sd.TrainConfig(**CONFIG), progress=False)
    arrays = {"params": params_of(result.model), "ema": params_of(result.ema_model)}
    try:
        sd.train(make_model(), dsm, sd.VP(), gmm_data(), sd.TrainConfig(**{**CONFIG, "batch_size": 30}), progress=False)
    except ValueError as e:
        arrays["indivisible"] = str(e)
    np.savez(out, *arrays["params"], *arrays["ema"], indivisible=arrays.get("indivisible", ""))


def _process(process_id: int, count: int, port: int, out: str, checkpoint_dir: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count, process_id=process_id)
    assert jax.process_count() == count
    result = sd.train(
        make_model(), dsm, sd.VP(), gmm_data(), sd.TrainConfig(**CONFIG), checkpoint_dir=checkpoint_dir, progress=False
    )
    if process_id == 0:
        np.savez(out, *params_of(result.model), step=result.step)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "parallel":
        _parallel(sys.argv[2])
    else:
        _process(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
