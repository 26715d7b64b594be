"""E4 (2207.05952 Table 1 at CPU scale): dropout vs no dropout, same net, data and schedule.

MLP 64-256-256-10 on the embedded digits, cross-entropy, SGD with batch 64:

    python train.py --config=configs/e4_flatness.py:dropout --workdir=runs/e4/dropout
    python train.py --config=configs/e4_flatness.py:plain   --workdir=runs/e4/plain
    python analyze.py --workdir=runs/e4/dropout,runs/e4/plain --analyses=hessian,profile --steps=last

Compares lambda_max, Tr H, 1-D filter-normalised profiles and test accuracy at the end of training
(the paper: 98.7 vs 98.1 % test accuracy, FNN on MNIST; flatter minima with dropout).
"""

from configs import base


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
    return c
