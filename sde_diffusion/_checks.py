"""Input validation shared by all modules.

Construction-time checks raise ``ValueError`` on concrete values. Call-time checks use
``equinox.error_if`` so they also fire under ``jax.jit`` (as a ``RuntimeError`` carrying the
message) and cost one fused comparison.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike


def is_concrete(*values) -> bool:
    """True when no leaf is a tracer, so that values can be inspected in Python."""
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


def require(condition: ArrayLike, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds everywhere.

    Skipped when the condition is traced (a module built inside ``jit``): construction under
    tracing cannot inspect values, and the call-time checks still apply.
    """
    if is_concrete(condition) and not bool(jnp.all(condition)):
        raise ValueError(message)


def check_time(t: ArrayLike, t0: ArrayLike, t1: ArrayLike, name: str = "t") -> Array:
    """Return ``t`` as a float array, failing (also under jit) when it leaves ``[t0, t1]``."""
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    bad = ~((t >= t0) & (t <= t1))  # NaN is bad too
    return eqx.error_if(t, jnp.any(bad), f"{name} must lie in [t0, t1] = [{t0}, {t1}]")


def check_finite(x: ArrayLike, name: str = "x") -> Array:
    """Return ``x`` as an array, failing (also under jit) when it holds NaN or inf."""
    x = jnp.asarray(x)
    return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), f"{name} contains non-finite values")


def check_shape(shape: tuple[int, ...], expected: tuple[int, ...], what: str) -> None:
    """Raise ``ValueError`` when a (static) shape differs from the expected one."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{what} has shape {tuple(shape)}, expected {tuple(expected)}")
