"""The one entry point of `train.py`: training or the SME sweep, chosen by the config.

Both drivers are peers over the same run bookkeeping (`sme.runs`): `sme.train.loop`
trains, `sme.sweep` runs discrete dropout GD beside its SDEs (``config.sde.enabled``).
Neither imports the other.
"""

from __future__ import annotations

from sme import config as config_lib
from sme import sweep
from sme.train import loop


def run(cfg, workdir: str, *, restart: bool = False) -> dict:
    """Validate `cfg`, then train or sweep into `workdir` (resuming it); returns the final record.

    Raises:
      ConfigError, RunError, NonFiniteLoss: as `sme.train.loop.run` and `sme.sweep.run_sde`.
    """
    if "sde" in cfg and cfg.sde.enabled:
        return sweep.run_sde(cfg, workdir, config_lib.build(cfg), restart=restart)
    return loop.run(cfg, workdir, restart=restart)
