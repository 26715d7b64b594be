"""The one entry point of `train.py`: training or the SME sweep, chosen by the config.

Both drivers are peers over the same run bookkeeping (`sme.runs`): `sme.train.loop`
trains, `sme.sweep` runs discrete dropout GD beside its SDEs (``config.sde.enabled``).
Neither imports the other. The config is read once, by `sme.config.build`; the drivers
take the typed `sme.config.Run` it returns.
"""

from __future__ import annotations

from sme import config as config_lib
from sme import sweep
from sme.train import loop


def run(cfg, workdir: str, *, restart: bool = False) -> dict:
    """Validate and build `cfg`, then train or sweep into `workdir` (resuming it); returns the final record.

    Raises:
      ConfigError, RunError, NonFiniteLoss: as `sme.train.loop.train` and `sme.sweep.run_sde`.
    """
    return execute(config_lib.build(cfg), workdir, restart=restart)


def execute(run: config_lib.Run, workdir: str, *, restart: bool = False) -> dict:
    """Train `run`, or run its SME sweep when it has one (``run.sweep``), into `workdir`."""
    if run.sweep is not None:
        return sweep.run_sde(run, workdir, restart=restart)
    return loop.train(run, workdir, restart=restart)
