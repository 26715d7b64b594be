"""`train.py` and the ``sme-train`` command: train a model, or run an SME sweep, from a config file.

    python train.py                                   # configs/default.py -> runs/default
    python train.py --config=configs/smoke.py --workdir=/tmp/smoke
    python train.py --config=configs/e2_noise.py:sgd      # a config's variant -> runs/e2_noise_sgd
    python train.py --config=configs/base.py --config.model.keep_prob=0.5 --config.optim.lr=0.05
    sme-train --config=configs/smoke.py --workdir=/tmp/smoke   # the same, from any directory

Re-running with the same --workdir resumes from the newest valid checkpoint (a finished run
prints its final metrics and does nothing else). One process writes a workdir at a time (a lock);
--restart starts over in a workdir whose checkpoints cannot be read. Errors are one line; add
--verbosity=1 for the traceback.

``--config=configs/NAME.py`` is read relative to the current directory; when no such file
exists there, it names the config of the installed ``configs`` package (so ``sme-train`` works
from any directory). Multi-process runs: ``--coordinator_address``, ``--num_processes``,
``--process_id`` or ``--distributed`` (see `sme.distributed`); process 0 writes the workdir.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sme import cli, distributed

_CONFIG = config_flags.DEFINE_config_file("config", cli.config_path("configs/default.py"),
                                          "Run config (a Python file; configs/NAME.py falls back to the installed "
                                          "configs package when no such file is in the current directory).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_RESTART = flags.DEFINE_bool("restart", False, "Start over from step 0 when no checkpoint in --workdir can be read "
                             "(or it has results but no config.json), discarding its checkpoints and metrics.")


def default_run_name(config_arg: str) -> str:
    """'configs/e2_noise.py:sgd' -> 'e2_noise_sgd'; 'configs/default.py' -> 'default'."""
    path, _, variant = config_arg.partition(".py:")
    name = os.path.splitext(os.path.basename(path if variant else config_arg))[0]
    return f"{name}_{variant}" if variant else name


def main(argv):
    del argv
    from sme.probe import quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu.so probe line on machines without a TPU
    cli.initialize_distributed()  # before any JAX computation
    import jax

    try:
        cfg = _CONFIG.value  # a config file that failed to load raises here, not while parsing flags
        cfg.train.dtype
    except Exception as err:  # noqa: BLE001 - config files raise many types
        cli.fail(RuntimeError(cli.describe_flag_error(err, sys.argv)), 2)
    if cfg.train.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from configs import base
    from sme import driver, io, runs
    from sme import config as config_lib
    from sme.train.loop import NonFiniteLoss

    workdir = _WORKDIR.value or os.path.join("runs", default_run_name(
        config_flags.get_config_filename(flags.FLAGS["config"])))
    logging.info("workdir: %s", os.path.abspath(workdir))
    try:
        config_lib.check_fields(cfg, base.get_config())
        record = driver.run(cfg, workdir, restart=_RESTART.value)
    except (config_lib.ConfigError, NonFiniteLoss, runs.RunError, io.CorruptArtifact,
            distributed.DistributedError) as err:
        cli.fail(err, 2)
    except OSError as err:  # a full disk, a permission: earlier files are intact (atomic writes)
        cli.fail(err, 1)
    if not distributed.is_writer():
        return
    summary = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k in ("train/risk", "test/risk", "test/acc"))
    print(f"done: step {record['step']}: {summary}\noutputs in {os.path.abspath(workdir)}")


def run():
    """The ``sme-train`` console command (and ``python train.py``)."""
    cli.show_in_help(sys.modules[__name__])
    app.run(main, flags_parser=cli.flags_parser)
