"""E4 (2207.05952 Table 1 at CPU scale): dropout vs no dropout, same net, data and schedule.

MLP 64-256-256-10 on the embedded digits, cross-entropy, SGD with batch 64:

    python train.py --config=configs/e4_flatness.py:dropout --workdir=runs/e4/dropout
    python train.py --config=configs/e4_flatness.py:plain   --workdir=runs/e4/plain
    python analyze.py --workdir=runs/e4/dropout,runs/e4/plain --analyses=hessian,profile --steps=last

Compares lambda_max, Tr H, 1-D filter-normalised profiles and test accuracy at the end of training
(the paper: 98.7 vs 98.1 % test accuracy, FNN on MNIST; flatter minima with dropout), over
NUM_SEEDS replicas, with the Hessian of the same loss for both nets (settings in config.analysis):

    python analyze.py --workdir=runs/e4/dropout,runs/e4/plain --analyses=hessian,hessian_modified \
        --steps=last --replica=all
"""

from ml_collections import ConfigDict

from configs import base

NUM_SEEDS = 5  # replicas (independent inits, masks and batches) trained at once; intervals over them
# Both nets are measured on the same losses: R_S (hessian, loss_kind=risk) and L_S at keep_prob 0.8
# from 8 frozen per-sample mask sets (hessian_modified), every replica.
HESSIAN = dict(loss_kind="risk", top_k=5, hutchpp_sketch=0)
HESSIAN_MODIFIED = dict(HESSIAN, loss_kind="modified_mc", keep_prob=0.8, num_masks=8)


def get_config(variant: str = "dropout"):
    if variant not in ("dropout", "plain"):
        raise ValueError(f"e4_flatness variant {variant!r}: expected 'dropout' or 'plain'")
    c = base.get_config()
    c.model.hidden = (256, 256)
    c.model.keep_prob = 0.8 if variant == "dropout" else 1.0
    c.optim.lr = 0.05
    c.train.batch_size = 64
    c.train.num_steps = 4000
    c.train.eval_every = 500
    c.train.checkpoint_steps = "log:6"
    c.train.num_replicas = NUM_SEEDS
    c.analysis.hessian = ConfigDict(HESSIAN)
    c.analysis.hessian_modified = ConfigDict(HESSIAN_MODIFIED)
    return c
