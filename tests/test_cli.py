import json

import numpy as np

from sde_diffusion.cli import DemoConfig, demo


def test_demo_writes_picture_and_metrics(tmp_path):
    metrics = demo(DemoConfig(out=tmp_path, n=600, sde_steps=200, rtol=1e-3))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    # exact score: both samplers land within a few noise floors of fresh data
    for name in ("reverse_sde", "pf_ode"):
        assert np.isfinite(metrics[name]["sw2"])
        assert metrics[name]["sw2"] < 3 * metrics["sw2_data_vs_data"]
        assert metrics[name]["nfe"] > 0
