import json
import sys

import jax
import numpy as np
import pytest

import sde_diffusion as sd
from sde_diffusion import cli


def _run(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["sde-diffusion", *argv])
    cli.main()


def test_demo_trains_samples_and_beats_the_prior(tmp_path):
    metrics = cli.demo(cli.DemoConfig(out=tmp_path, steps=1000, n=1000, sample_steps=20, progress=False))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["train_steps"] == 1000 and metrics["nfe"] == 20
    # an honest yardstick: the prior's own samples against the same held-out moons
    held_out = sd.moons(1000, seed=1)
    prior = sd.VP().prior.sample(jax.random.key(0), (1000, 2))
    sw2_prior = float(sd.sliced_wasserstein(prior, held_out, jax.random.key(1)))
    assert metrics["sw2_samples_vs_held_out"] < 0.5 * sw2_prior
    assert np.isfinite(metrics["sw2_data_vs_held_out"])


def test_train_resume_and_sample_from_the_command_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    common = ["--out", str(run), "--data", "gaussian_mixture", "--n-data", "2000", "--no-progress"]
    common += ["--model.width", "32", "--model.depth", "2", "--train.batch-size", "64", "--train.checkpoint-every", "20"]
    _run(monkeypatch, "train", *common, "--train.steps", "20")
    _run(monkeypatch, "train", *common, "--train.steps", "30")  # resumes at 20
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 30
    assert json.loads((run / "run.json").read_text())["model"]["width"] == 32
    out = tmp_path / "x.npz"
    _run(monkeypatch, "sample", "--run", str(run), "--method", "dpm++2m", "--steps", "5", "--n", "64", "--output", str(out))
    x = np.load(out)["samples"]
    assert x.shape == (64, 2) and np.all(np.isfinite(x))
    png = tmp_path / "x.png"
    _run(monkeypatch, "sample", "--run", str(run), "--method", "ddim", "--steps", "4", "--n", "64", "--output", str(png))
    assert png.stat().st_size > 5_000
    with pytest.raises(ValueError, match="another model"):
        _run(monkeypatch, "train", *common, "--train.steps", "40", "--model.width", "16")
    with pytest.raises(FileNotFoundError, match="run.json"):
        cli.sample_command(cli.SampleCommand(run=tmp_path / "missing"))
    with pytest.raises(ValueError, match=".png or .npz"):
        cli.sample_command(cli.SampleCommand(run=run, output=tmp_path / "x.txt"))


def test_conditional_training_and_guided_sampling_from_the_command_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _run(monkeypatch, "train", "--out", str(run), "--data", "gaussian_mixture", "--conditional", "--no-progress",
         "--model.width", "64", "--model.depth", "2", "--train.steps", "600", "--train.checkpoint-every", "600")
    assert json.loads((run / "run.json").read_text())["model"]["num_classes"] == 8
    target = np.asarray(sd.gaussian_mixture_oracle().means[2])  # component 2 sits at (0, 1)
    norms = {}
    for guidance in ("1", "3"):
        out = tmp_path / f"class2_w{guidance}.npz"
        _run(monkeypatch, "sample", "--run", str(run), "--class", "2", "--guidance", guidance, "--n", "500", "--output", str(out))
        x = np.load(out)["samples"]
        assert np.linalg.norm(x.mean(axis=0) - target) < 0.3
        norms[guidance] = float(np.linalg.norm(x.mean(axis=0)))
    assert norms["3"] > norms["1"]  # guidance pushes samples away from the other classes
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        _run(monkeypatch, "sample", "--run", str(run), "--class", "8", "--n", "8", "--output", str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="need --class"):
        _run(monkeypatch, "sample", "--run", str(run), "--guidance", "2", "--n", "8", "--output", str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="labelled data"):
        _run(monkeypatch, "train", "--out", str(tmp_path / "moons"), "--data", "moons", "--conditional", "--no-progress")
