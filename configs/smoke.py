"""Seconds-long run for tests: a small MLP with dropout on 300 digits.

    python train.py --config=configs/smoke.py --workdir=/tmp/smoke
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.num_train = 300
    c.model.hidden = (32,)
    c.optim.lr = 0.2
    c.train.num_steps = 60
    c.train.batch_size = 50
    c.train.eval_every = 20
    c.train.checkpoint_steps = "0,20,40"
    c.train.checkpoint_every = 10
    c.train.log_every_secs = 1.0
    return c
