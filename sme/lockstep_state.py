"""The lockstep state and the path tags shared by both layouts (`sme.lockstep`, `sme.lockstep_batched`).

A leaf module: `sme.lockstep` chooses the layout and imports `sme.lockstep_batched`, which needs these
names too; keeping them here leaves the import graph without a cycle.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

# The ODE controls: the drift of the named SME variant with the diffusion switched off.
ODE_DRIFTS = {"ode1": "order1", "ode2": "order2"}
# Per-path tags folded into the replica keys (SHARED_TAG: the draws every variant shares).
TAGS = {"order1": 1, "order2": 2, "r2": 3, "svag": 4, "ode1": 5, "ode2": 6}
SHARED_TAG = 0


class Lockstep(NamedTuple):
    """step: int32 scalar; paths: name -> params with a leading replica axis R."""

    step: jax.Array
    paths: dict
