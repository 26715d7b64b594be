"""Multi-process runs over `jax.distributed`: one process per host, one global mesh.

A TPU pod slice or a multi-GPU cluster runs one Python process per host. Each
process runs the same program (`train.py`, the SME sweep, `analyze.py`); JAX
joins them into one set of global devices, and `sme.runs.shard_leading` splits
replicas, seeds and analysis items over all of them (all processes x their local
devices) with one mesh. Results are gathered back to every process
(`to_host`), and only process 0 writes the run's files (`is_writer`): the
others write nothing and take no workdir lock. The numbers are those of a
single-process run on the same total device count.

When to join (`requested`; the entry points call `initialize` before any JAX computation,
with the flags defined in `sme.cli`):

* ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``: explicit
  (any of the three given asks for it; the others then come from the cluster
  environment, as `jax.distributed.initialize` does);
* ``--distributed``: everything auto-detected by `jax.distributed.initialize()`
  (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes);
* without flags, the environment alone: ``JAX_COORDINATOR_ADDRESS`` set, or a SLURM
  or Open MPI job of more than one task.

Otherwise the run is single-process and nothing here changes it. On CPU, processes
exchange data through the gloo collectives (``jax_cpu_collectives_implementation``,
JAX's default, set explicitly here).
"""

from __future__ import annotations

import os

import jax
import numpy as np


class DistributedError(RuntimeError):
    """The multi-process settings are inconsistent."""


def _cluster_env_asks() -> bool:
    """True when the environment alone says this is one process of several (cheap checks, no network)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def requested(coordinator_address: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, auto: bool = False) -> dict | None:
    """The `initialize` arguments asked for by these settings (the command-line flags) or the environment,
    or None for a single-process run."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()) or auto or _cluster_env_asks():
        return {k: v for k, v in given.items() if v is not None}
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the other processes of a multi-process run (`jax.distributed.initialize`).

    Must be called before any JAX computation. Missing arguments are auto-detected
    from the cluster environment by JAX.

    Raises:
      DistributedError: a process id outside 0..num_processes-1, or a coordinator
        address without a port.
    """
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id} is not in 0..{num_processes - 1} "
                               f"(--num_processes={num_processes})")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise DistributedError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need collectives
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def is_writer() -> bool:
    """True in the process that writes the run's files: process 0 (the only one of a single-process run)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def to_host(tree):
    """Every array leaf of ``tree`` as a NumPy array on this host, gathered from all processes when it is
    split over several (`jax.experimental.multihost_utils.process_allgather`); `jax.device_get` otherwise.

    In a multi-process run every process must call it (a collective), with the same tree.
    """
    if not multi_process():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return jax.device_get(leaf)

    return jax.tree_util.tree_map(fetch, tree)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing in a single-process run)."""
    if multi_process():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value, what: str):
    """``value`` (an int or a small tuple of ints), checked equal on every process; also a barrier.

    Raises:
      DistributedError: processes disagree (e.g. they see different files in the workdir).
    """
    if not multi_process():
        return value
    from jax.experimental import multihost_utils

    mine = np.asarray(value, np.int32).reshape(-1)  # steps and counts; JAX without x64 has no int64
    every = np.asarray(multihost_utils.process_allgather(mine))
    if not (every == every[0]).all():
        raise DistributedError(f"processes disagree on {what} ({every.tolist()}); the workdir must be on a "
                               "filesystem every process sees")
    return value
