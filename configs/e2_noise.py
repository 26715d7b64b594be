"""E2/E3 (arXiv 2305.15850 at CPU scale): noise structure of dropout vs SGD on the digits.

MLP 64-50-50-10 (the paper's 784-50-50-10 on 8x8 digits), cross-entropy, all 1,500 training digits.

* ``dropout``: full-batch dropout GD (shared masks, keep_prob 0.8 on both hidden layers) — the
  papers' setting, where all the noise is dropout noise;
* ``sgd``: no dropout, minibatch SGD (batch 32) with the same learning rate — the reference.

Both keep the raveled weights of every step over the last 1,000 steps (snapshots.npz) for the
random-trajectory PCA.

    python train.py --config=configs/e2_noise.py:dropout --workdir=runs/e2/dropout
    python train.py --config=configs/e2_noise.py:sgd     --workdir=runs/e2/sgd
    python analyze.py --workdir=runs/e2/dropout --analyses=alignment,covariance,flatness
    python analyze.py --workdir=runs/e2/dropout,runs/e2/sgd --analyses=trajectory_flatness --steps=last
"""

from configs import base


def get_config(variant: str = "dropout"):
    if variant not in ("dropout", "sgd"):
        raise ValueError(f"e2_noise variant {variant!r}: expected 'dropout' or 'sgd'")
    c = base.get_config()
    c.model.hidden = (50, 50)
    c.optim.lr = 0.05
    if variant == "dropout":
        c.model.keep_prob = 0.8
        c.mask_mode = "shared"
        c.train.batch_size = 0
    else:
        c.model.keep_prob = 1.0
        c.train.batch_size = 32
    c.train.num_steps = 5000
    c.train.eval_every = 250
    c.train.checkpoint_steps = "log:8"
    c.train.snapshot_start = 4000
    c.train.snapshot_every = 1
    return c
