import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import sde_diffusion as sd
from _training_worker import CONFIG, dsm, gmm_data, make_model, params_of

WORKER = Path(__file__).with_name("_training_worker.py")
MARK = 1e4  # a finite marker value that makes the test objective non-finite


def _config(**kw):
    return sd.TrainConfig(**{**CONFIG, **kw})


def _steps(directory) -> list[int]:
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def _assert_same_params(a, b):
    for x, y in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_array_equal(x, y)


class _Data:
    """The GMM data set, with hooks: ``MARK`` in the first row of the batches of ``marked_steps``
    (every time) and of the ``marked_calls``-th calls (first pass only); ``on_call(step)`` runs first."""

    def __init__(self, marked_steps=(), marked_calls=(), on_call=None):
        self.base, self.calls = gmm_data(), 0
        self.marked_steps, self.marked_calls, self.on_call = set(marked_steps), set(marked_calls), on_call
        self.event_shape, self.num_examples = self.base.event_shape, self.base.num_examples

    def batch(self, step, batch_size):
        if self.on_call is not None:
            self.on_call(step)
        x = self.base.batch(step, batch_size).copy()
        if step in self.marked_steps or self.calls in self.marked_calls:
            x[0] = MARK
        self.calls += 1
        return x


def _marked_dsm(model, sde, batch, key):
    """``dsm``, made NaN (loss and gradients) on a batch holding ``MARK``."""
    return dsm(model, sde, batch, key) * jnp.where(jnp.any(batch == MARK), jnp.nan, 1.0)


# -- one run, several checks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """40 steps on the 2-D GMM, logged every step, samples every 20 steps; the SDE holds an array."""
    out = tmp_path_factory.mktemp("run")
    sde = sd.VP(beta_min=jnp.array(0.1), beta_max=jnp.array(20.0))
    model = make_model(sde)
    config = sd.TrainConfig(
        steps=40, batch_size=64, learning_rate=1e-2, warmup_steps=5, log_every=1, sample_every=20, seed=3
    )
    result = sd.train(
        model,
        dsm,
        sde,
        gmm_data(),
        config,
        log_path=out / "log.jsonl",
        sample_fn=lambda m, key: jax.random.normal(key, (100, 2)) + m.fn.state["l2"]["bias"][...],
        sample_dir=out / "samples",
        progress=False,
    )
    return model, result, out


def test_training_reduces_the_dsm_loss(run):
    _, result, _ = run
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 40 and result.step == 40 and result.num_skipped == 0
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)
    # the ε-DSM minimum is E‖ε − E[ε | x_t]‖² ≥ 0; a network predicting 0 scores E‖ε‖² = 2
    assert 0 < last < 2


def test_only_nnx_params_are_trained(run):
    model, result, _ = run
    before, after = model.fn, result.model.fn
    np.testing.assert_array_equal(after.state["freq"][...], before.state["freq"][...])  # a plain nnx.Variable
    np.testing.assert_array_equal(after.sde.beta_min, before.sde.beta_min)  # an SDE array field
    np.testing.assert_array_equal(result.ema_model.fn.state["freq"][...], before.state["freq"][...])
    for x, y in zip(params_of(model), params_of(result.model), strict=True):
        assert x.dtype == y.dtype == np.float32 and not np.allclose(x, y)


def test_metrics_log_and_sample_pictures(run):
    _, result, out = run
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert lines == result.history
    assert set(lines[0]) == {"step", "loss", "grad_norm", "learning_rate", "steps_per_s", "skipped"}
    assert [r["step"] for r in lines] == list(range(1, 41))
    # warm-up: η (n + 1)/W for the first W = 5 updates, then η
    np.testing.assert_allclose([r["learning_rate"] for r in lines[:7]], 1e-2 * np.minimum(1, np.arange(1, 8) / 5))
    assert all(r["grad_norm"] > 0 and r["steps_per_s"] > 0 and r["skipped"] == 0 for r in lines)
    pictures = sorted(p.name for p in (out / "samples").iterdir())
    assert pictures == ["samples_0000020.png", "samples_0000040.png"]
    image = matplotlib.image.imread(out / "samples" / pictures[0])
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_csv_metrics_log_appends_under_one_header(tmp_path):
    from sde_diffusion.training import _MetricsLog

    records = [dict(step=s, loss=0.5, grad_norm=None, learning_rate=1e-3, steps_per_s=9.0, skipped=s) for s in (1, 2)]
    for record in records:  # reopened as by a resumed run
        log = _MetricsLog(tmp_path / "log.csv")
        log.write(record)
        log.close()
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and rows[0]["grad_norm"] == "" and rows[1]["skipped"] == "2"


def test_image_samples_are_drawn_as_a_grid(tmp_path):
    from sde_diffusion.training import save_samples_png

    save_samples_png(tmp_path / "grid.png", np.random.default_rng(0).uniform(size=(10, 8, 8, 1)))
    assert matplotlib.image.imread(tmp_path / "grid.png").ndim == 3
    with pytest.raises(ValueError, match="event shape"):
        save_samples_png(tmp_path / "bad.png", np.zeros((4, 3, 3)))


# -- EMA -----------------------------------------------------------------------------------


def test_ema_follows_the_recorded_parameters(tmp_path):
    decay, steps = 0.2, 4
    model = make_model()
    result = sd.train(
        model, dsm, sd.VP(), gmm_data(), _config(steps=steps, ema_decay=decay, checkpoint_every=1, keep_checkpoints=9),
        checkpoint_dir=tmp_path, progress=False,
    )
    assert _steps(tmp_path) == [1, 2, 3, 4]
    ema = params_of(model)  # e_0 = θ_0
    for j in range(1, steps + 1):
        d = min(decay, j / (9 + j))  # step k = j − 1: min(d, (1 + k)/(10 + k))
        theta = params_of(sd.restore_model(model, tmp_path, ema=False, step=j))
        ema = [d * e + (1 - d) * p for e, p in zip(ema, theta)]
        for mine, saved in zip(ema, params_of(sd.restore_model(model, tmp_path, ema=True, step=j)), strict=True):
            np.testing.assert_allclose(saved, mine, rtol=1e-6, atol=1e-7)
    for mine, final in zip(ema, params_of(result.ema_model), strict=True):
        np.testing.assert_allclose(final, mine, rtol=1e-6, atol=1e-7)


# -- checkpoints and resume ----------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = sd.train(
        make_model(), dsm, sd.VP(), gmm_data(), _config(steps=10, checkpoint_every=2, keep_checkpoints=2),
        checkpoint_dir=directory, progress=False,
    )
    return result, directory


def test_resume_is_bit_identical_and_old_checkpoints_are_dropped(tmp_path, uninterrupted):
    full, full_dir = uninterrupted
    assert _steps(full_dir) == [8, 10]  # keep_checkpoints = 2
    first = sd.train(make_model(), dsm, sd.VP(), gmm_data(), _config(steps=5), checkpoint_dir=tmp_path, progress=False)
    assert first.step == 5 and _steps(tmp_path) == [3, 5]
    resumed = sd.train(
        make_model(seed=7), dsm, sd.VP(), gmm_data(), _config(steps=10), checkpoint_dir=tmp_path, progress=False
    )
    assert resumed.step == 10
    _assert_same_params(resumed.model, full.model)
    _assert_same_params(resumed.ema_model, full.ema_model)
    _assert_same_params(sd.restore_model(make_model(seed=5), full_dir), full.ema_model)
    _assert_same_params(sd.restore_model(make_model(seed=5), full_dir, ema=False), full.model)


def test_ctrl_c_saves_the_current_step(tmp_path, uninterrupted):
    def interrupt(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        sd.train(make_model(), dsm, sd.VP(), _Data(on_call=interrupt), _config(steps=10, checkpoint_every=100),
                 checkpoint_dir=tmp_path, progress=False)
    assert signal.getsignal(signal.SIGINT) is previous
    assert _steps(tmp_path) == [4]  # step 3 finished, then the run stopped
    resumed = sd.train(make_model(), dsm, sd.VP(), gmm_data(), _config(steps=10), checkpoint_dir=tmp_path, progress=False)
    _assert_same_params(resumed.model, uninterrupted[0].model)


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, uninterrupted):
    _, directory = uninterrupted
    other = make_model(hidden=16)
    with pytest.raises(ValueError, match="does not match this run's params.*architecture"):
        sd.train(other, dsm, sd.VP(), gmm_data(), _config(steps=12), checkpoint_dir=directory, progress=False)
    with pytest.raises(ValueError, match="does not match"):
        sd.restore_model(other, directory)
    with pytest.raises(ValueError, match="optimiser"):
        sd.train(make_model(), dsm, sd.VP(), gmm_data(), _config(steps=12, weight_decay=0.1),
                 checkpoint_dir=directory, progress=False)
    with pytest.raises(ValueError, match="resume=True"):
        sd.train(make_model(), dsm, sd.VP(), gmm_data(), _config(steps=12), checkpoint_dir=directory, resume=False,
                 progress=False)
    with pytest.raises(FileNotFoundError):
        sd.restore_model(make_model(), tmp_path / "missing")
    assert _steps(directory) == [8, 10]  # nothing written by the failed calls


# -- non-finite guard ----------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_a_bad_streak_restores_the_checkpoint(tmp_path):
    # step 1 is bad alone (skipped); steps 5 and 6 are bad on the first pass only: after
    # max_bad_steps = 2 the checkpoint of step 6 (params as after step 4) is restored
    data = _Data(marked_steps=(1,), marked_calls=(5, 6))
    config = _config(steps=8, checkpoint_every=1, keep_checkpoints=20, max_bad_steps=2)
    with pytest.warns(RuntimeWarning, match="restored the checkpoint of step 6"):
        result = sd.train(make_model(), _marked_dsm, sd.VP(), data, config, checkpoint_dir=tmp_path, progress=False)
    assert (result.step, result.num_skipped, result.num_restored) == (8, 3, 1)
    assert data.calls == 9  # steps 0-6, then 6 and 7 again
    params = {j: sd.restore_model(make_model(), tmp_path, ema=False, step=j) for j in (1, 2, 3, 5, 6, 7)}
    _assert_same_params(params[1], params[2])  # step 1 skipped: parameters unchanged
    _assert_same_params(params[5], params[6])
    assert not np.array_equal(params_of(params[2])[0], params_of(params[3])[0])
    assert not np.array_equal(params_of(params[6])[0], params_of(params[7])[0])
    assert all(np.isfinite(p).all() for p in params_of(result.model) + params_of(result.ema_model))
    assert [(h["step"], h["skipped"]) for h in result.history] == [(3, 1), (6, 1), (8, 0)]


def test_a_bad_streak_without_checkpoint_or_after_too_many_restorations_stops(tmp_path):
    with pytest.raises(RuntimeError, match="no checkpoint to restore"):
        sd.train(make_model(), _marked_dsm, sd.VP(), _Data(marked_steps=(1, 2)), _config(max_bad_steps=2),
                 progress=False)
    data = _Data(marked_steps=(4, 5))  # bad on every pass
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="after 1 restorations"):
        sd.train(make_model(), _marked_dsm, sd.VP(), data, _config(max_bad_steps=2, checkpoint_every=3,
                 max_restorations=1), checkpoint_dir=tmp_path, progress=False)
    assert data.calls == 6 + 3  # steps 0-5, then 3-5 once more


# -- precision, devices, processes ---------------------------------------------------------


def test_bfloat16_network_keeps_float32_parameters():
    model = make_model(dtype=jnp.bfloat16)
    assert model.fn(jnp.float32(0.5), jnp.ones(2)).dtype == jnp.float32
    result = sd.train(model, dsm, sd.VP(), gmm_data(), _config(steps=4, log_every=1), progress=False)
    assert all(np.isfinite(h["loss"]) for h in result.history)
    for x, y in zip(params_of(model), params_of(result.model), strict=True):
        assert y.dtype == np.float32 and not np.array_equal(x, y)


def _python(*args, env=None):
    """Start the worker script (the caller overlaps its own work with the start-up)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=180):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def one_device():
    """The reference run of the device and process tests: ``CONFIG`` on one device."""
    return sd.train(make_model(), dsm, sd.VP(), gmm_data(), _config(), progress=False)


def test_data_parallel_on_four_devices_matches_one(tmp_path, request):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    worker = _python("parallel", tmp_path / "out.npz", env={"XLA_FLAGS": flags})
    one_device = request.getfixturevalue("one_device")
    _finish(worker)
    out = np.load(tmp_path / "out.npz")
    expected = params_of(one_device.model) + params_of(one_device.ema_model)
    for i, p in enumerate(expected):
        np.testing.assert_allclose(out[f"arr_{i}"], p, rtol=1e-5, atol=1e-6)
    assert str(out["indivisible"]).startswith("batch_size 30 must be divisible by the number of devices (4)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, request):
    port = _free_port()
    workers = [_python("process", i, 2, port, tmp_path / "out.npz", tmp_path / "ckpt") for i in range(2)]
    one_device = request.getfixturevalue("one_device")
    for w in workers:
        _finish(w)
    out = np.load(tmp_path / "out.npz")
    assert int(out["step"]) == CONFIG["steps"] and _steps(tmp_path / "ckpt") == [3, 6]
    for i, p in enumerate(params_of(one_device.model)):
        np.testing.assert_allclose(out[f"arr_{i}"], p, rtol=1e-5, atol=1e-6)


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps must be ≥ 1"),
        (dict(batch_size=0), "batch_size must be ≥ 1"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(ema_decay=1.0), r"ema_decay must lie in \[0, 1\)"),
        (dict(ema_decay=-0.1), "ema_decay"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(log_every=0), "log_every"),
        (dict(checkpoint_every=0), "checkpoint_every"),
        (dict(keep_checkpoints=0), "keep_checkpoints"),
        (dict(max_bad_steps=0), "max_bad_steps"),
        (dict(sample_every=-1), "sample_every"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        sd.TrainConfig(**{"steps": 10, **kw})


def test_invalid_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="steps must be an int"):
        sd.TrainConfig(steps=10.0)
    with pytest.raises(ValueError, match="sample_fn and sample_dir"):
        sd.train(make_model(), dsm, sd.VP(), gmm_data(), _config(sample_every=2), progress=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sd.train(sd.Score(lambda t, x: x), dsm, sd.VP(), gmm_data(), _config(), progress=False)
    images = np.zeros((8, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="event shape"):
        sd.train(make_model(), dsm, sd.VP(), images, _config(sample_every=2), sample_fn=lambda m, k: images,
                 sample_dir="unused", progress=False)


def test_tile_images_places_each_image_row_by_row():
    images = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 2, 3, 1), np.float32)
    grid = sd.tile_images(images, columns=3, fill=-1.0)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    for k in range(5):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(grid[1 + 3 * r : 3 + 3 * r, 1 + 4 * c : 4 + 4 * c], k)
    assert grid[0].max() == -1 and grid[4:, 9:].max() == -1  # gaps and the empty sixth cell
    with pytest.raises(ValueError, match="shape"):
        sd.tile_images(np.zeros((3, 8, 8)))
