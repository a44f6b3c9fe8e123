"""The README's Python examples run as written."""

import re
from pathlib import Path


def test_readme_examples_run():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, re.S))
    assert "sd.sample" in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["x"].shape == (1000, 2)
    assert namespace["result"].validation_error < namespace["result"].validation_error_initial
    assert namespace["info"].nfe > 0
    exact = namespace["jax"].vmap(namespace["mixture"].log_prob)(namespace["points"]).mean()
    assert abs(float(namespace["log_p"].mean() - exact)) < 1e-2
    history = namespace["trained"].history
    assert namespace["x0"].shape == (1000, 2) and history[-1]["loss"] < history[0]["loss"]
    assert namespace["x_class2"].shape == (500, 2) and namespace["guided_info"].nfe == 20
    assert float(namespace["jnp"].abs(namespace["inpainted"][:, 0] - 0.7).max()) < 0.1
    assert namespace["truth"].dim == 1
