"""E6 (Kimura & Hino, arXiv 2206.10936, at CPU scale): Fisher quantities and R_1 across keep_prob.

MLP 64-100-10 with dropout on the hidden layer only and MSE on one-hot targets, so that the
closed-form R_1 = ((1 - p)/(2 n p)) sum_i sum_j ||W_j||^2 h_j(x_i)^2 holds; full-batch dropout GD on
the first 1,000 digits. The variant is the keep probability:

    python train.py --config=configs/e6_fisher.py:0.5 --workdir=runs/e6/p0.5
    python analyze.py --workdir=runs/e6/p0.5 --analyses=fisher --steps=last

`python analyze.py --reproduce=cpu` sweeps p in {0.5, 0.6, 0.7, 0.8, 0.9, 1.0}.
"""

from configs import base


def get_config(keep_prob: str = "0.8"):
    c = base.get_config()
    c.data.num_train = 1000
    c.model.hidden = (100,)
    c.model.keep_prob = float(keep_prob)
    c.model.dropout_layers = "last"
    c.loss = "mse"
    c.mask_mode = "shared"
    c.optim.lr = 0.05
    c.train.batch_size = 0
    c.train.num_steps = 3000
    c.train.eval_every = 250
    c.train.checkpoint_steps = "log:4"
    return c
