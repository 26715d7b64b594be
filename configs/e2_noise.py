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

from ml_collections import ConfigDict

from configs import base

# Analysis settings, fixed before the runs (the report reads them from here):
# * alignment: H of R_S for both noises and both runs (the same loss on every side), K = 64
#   samples of each noise (masks; examples), alpha also with the unbiased ||Sigma||_F;
# * flatness (gradient data): 640 rows for 60 PCs (>= 10 rows per PC, so the sample eigenvalues are
#   not dominated by their finite-K bias); trajectory data: 1,000 snapshots;
# * the headline psi fits PCs 1-30 with drift PCs (trend fraction > 0.5) left out, and the
#   sensitivity table refits PCs 1-16/1-30/1-60 and max_trend 0.4-0.7, at c = 2 and c = e.
SENSITIVITY = dict(num_components=60, fit_components=30, sensitivity_components="16,30,60")
ANALYSIS = dict(
    alignment=dict(loss_kind="risk", num_masks=64, sgd_examples=64),
    flatness=dict(SENSITIVITY, num_masks=640),
    trajectory_flatness=dict(SENSITIVITY, max_trend=0.5, sensitivity_max_trend="0.4,0.5,0.6,0.7"),
)


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
    for name, settings in ANALYSIS.items():
        c.analysis[name] = ConfigDict(dict(settings, noise="minibatch") if name == "flatness" and variant == "sgd"
                                      else settings)
    return c
