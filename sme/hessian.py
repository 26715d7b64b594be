"""Hessian-vector products and curvature matvecs (forward-over-reverse).

H v = d/dt grad f(theta + t v) |_{t=0}: one jvp of the gradient, about 2-3x the
cost of one gradient, and never an explicit P x P matrix.
"""

from __future__ import annotations

import jax


def hvp(fn, params, v):
    """Hessian of scalar ``fn(params)`` times the pytree ``v`` (same structure). Cost: ~1 HVP."""
    return jax.jvp(jax.grad(fn), (params,), (v,))[1]
