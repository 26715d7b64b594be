"""Train a model with dropout (or a regularised objective) from a config file.

    python train.py                                   # configs/default.py -> runs/default
    python train.py --config=configs/smoke.py --workdir=/tmp/smoke
    python train.py --config=configs/e2_noise.py:sgd      # a config's variant -> runs/e2_noise_sgd
    python train.py --config=configs/base.py --config.model.keep_prob=0.5 --config.optim.lr=0.05

The same command is installed as ``sme-train`` (works from any directory). Re-running with the
same --workdir resumes from the newest valid checkpoint (a finished run prints its final metrics
and does nothing else). One process writes a workdir at a time (a lock); --restart starts over in
a workdir whose checkpoints cannot be read. Errors are one line; add --verbosity=1 for the
traceback. Flags and behaviour: `sme.train_cli`.
"""

from sme.train_cli import default_run_name, main, run  # noqa: F401  (the entry point and its helpers)

if __name__ == "__main__":
    run()
