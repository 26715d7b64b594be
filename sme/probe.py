"""Silence JAX's TPU probe message on machines without a TPU, and nothing else.

On start-up JAX tries every backend; without libtpu installed the TPU attempt
logs "Unable to initialize backend 'tpu': ... Failed to open libtpu.so: ...
cannot open shared object file" from every process. That line says only that
this is not a TPU host. `quiet_tpu_probe` drops exactly that record: any other
backend message (a TPU host whose libtpu fails to start, a GPU problem) still shows.
"""

from __future__ import annotations

import logging

_LOGGER = "jax._src.xla_bridge"


class _NoTpuProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        absent = "libtpu.so" in message and ("cannot open shared object file" in message or "No such file" in message)
        return not (message.startswith("Unable to initialize backend 'tpu'") and absent)


def quiet_tpu_probe() -> None:
    """Install the filter on JAX's backend logger (idempotent). Call before the first JAX computation."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _NoTpuProbe) for f in logger.filters):
        logger.addFilter(_NoTpuProbe())
