"""Default run: MLP 64-128-128-10 with dropout (keep_prob 0.8) on the embedded digits.

    python train.py                      # writes runs/default

About a minute on 2 CPU cores.
"""

from configs import base


def get_config():
    return base.get_config()
