"""E5 (2207.05952 Fig. 2 at CPU scale): training on R_S + R_1 vs dropout vs R_S alone.

One hidden layer of 1,000 ReLU units (the paper's 784-1000-10 on the 64-pixel digits), MSE on
one-hot targets (R_1's closed form needs MSE), dropout on the hidden layer only, the first 1,000
training digits, full-batch gradient descent:

    python train.py --config=configs/e5_r1.py:dropout --workdir=runs/e5/dropout
    python train.py --config=configs/e5_r1.py:r1      --workdir=runs/e5/r1
    python train.py --config=configs/e5_r1.py:rs      --workdir=runs/e5/rs

The paper reports > 88 % test accuracy for dropout and R_S + R_1 against about 79 % for R_S on the
first 1,000 MNIST images; `python analyze.py --reproduce=cpu` runs all three and tabulates them.
"""

from configs import base

VARIANTS = {"dropout": "dropout", "r1": "l1", "rs": "r_s"}


def get_config(variant: str = "dropout"):
    if variant not in VARIANTS:
        raise ValueError(f"e5_r1 variant {variant!r}: expected one of {tuple(VARIANTS)}")
    c = base.get_config()
    c.data.num_train = 1000
    c.model.hidden = (1000,)
    c.model.keep_prob = 0.8
    c.model.dropout_layers = "last"
    c.loss = "mse"
    c.objective = VARIANTS[variant]
    c.mask_mode = "shared"
    c.optim.lr = 0.015
    c.train.batch_size = 0
    c.train.num_steps = 6000
    c.train.eval_every = 100
    c.train.checkpoint_steps = "log:6"
    return c
