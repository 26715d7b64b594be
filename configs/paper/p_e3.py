"""P-E3 (Feng & Tu, PNAS 2021): the inverse variance-flatness relation on MNIST, SGD and dropout SGD.

Paper setting: MNIST, 784-50-50-10 ReLU without biases, cross-entropy, SGD with batch 50 and
lr 0.1, trained into the exploration phase (the loss has stopped falling systematically); PCA of
the 2,500 weights between the two hidden layers over a 10-epoch window; interval flatness F_i
of the loss along each PC; the fit sigma_i^2 ~ F_i^(-psi) with the drift mode PC 1 left out.
Paper number: psi ~ 4 for SGD. The same for dropout SGD (keep_prob 0.8 on the hidden layers).

    python train.py --config=configs/paper/p_e3.py:sgd,seed=0 --workdir=runs/p_e3/sgd

Analysis settings, fixed here before any run (`ANALYSIS`): theta* = the last snapshot; F_i of
R_S (no dropout, the same loss for both runs) on the first 10,000 training images, c = e (Feng &
Tu's) for the headline and c = 2 beside it; PCs 1-30 with PC 1 excluded and every PC whose
coordinate is more than 50 % a degree-4 Legendre trend in time (the drift-mode rule,
`sme.landscape.trend_fraction`); capped widths left out. The sensitivity table reports the
PC range 16 / 30 / 60, max_trend 0.4-0.7 (and the rule off) and c = 2 / e.

Budget choices: 24,000 steps (20 epochs), the window = the last 10 epochs (12,000 steps) with a
snapshot every 10 steps (1,201 snapshots of all 42,200 weights, 200 MB; the 2,500-weight block
is cut from them; every step would be 12,001 x 42,200 floats, 2 GB). Three seeds per variant.
"""

import math

from configs import base
from configs.paper import common

DEFAULTS = dict(seed=0, steps=24000, window=12000, every=10)
PAPER = {"psi_sgd": ("psi, SGD (c = e, PCs 2-30)", "about 4", (4.0, 4.0)),
         "psi_dropout": ("psi, dropout SGD (c = e, PCs 2-30)", "not stated", None)}
BUDGET = 1200.0
KERNEL = "interval-flatness bisections: R_S of 10,000 images along 60 PCs x 2 factors (vmapped)"
BLOCK = ("hidden", 1, "w")  # the 50 x 50 weights between the two hidden layers
ANALYSIS = dict(num_examples=10000, num_components=60, headline_components=30, num_excluded=1,
                max_trend=0.5, trend_degree=4, headline_factor=math.e, init_step=1e-3, max_distance=1e3,
                num_bisect=20, num_boot=2000,
                sensitivity_components=(16, 30, 60), sensitivity_trend=(0.4, 0.5, 0.6, 0.7, 1.0))


def get_config(variant: str = "sgd"):
    name, v, tiny = common.parse_variant(variant, ("sgd", "dropout"), DEFAULTS)
    c = base.get_config()
    c.seed = v["seed"]
    c.data.name = "mnist"
    c.model.hidden = (50, 50)
    c.model.use_bias = False
    c.model.output_bias = False
    c.model.keep_prob = 0.8 if name == "dropout" else 1.0
    c.model.dropout_layers = "all" if name == "dropout" else "none"
    c.loss = "cross_entropy"
    c.objective = "dropout" if name == "dropout" else "r_s"
    c.optim.lr = 0.1
    c.train.batch_size = 50
    c.train.num_steps = v["steps"]
    c.train.eval_every = 2000
    c.train.checkpoint_steps = ""
    c.train.checkpoint_every = v["steps"]
    c.train.snapshot_start = v["steps"] - v["window"]
    c.train.snapshot_every = v["every"]
    c.train.log_every_secs = 30.0
    if tiny:
        common.shrink(c, num_train=300, steps=60)
        c.train.snapshot_start, c.train.snapshot_every = 20, 1
        c.model.hidden = (8, 8)
    return c


def analysis_settings(tiny: bool) -> dict:
    return dict(ANALYSIS, num_examples=100, num_boot=200) if tiny else dict(ANALYSIS)


def get_plan(tiny: bool = False) -> list[dict]:
    """SGD and dropout SGD for every seed, each followed by the block analysis (`sme.paper_e3`)."""
    from sme import paper_e3

    post = lambda workdir: paper_e3.analyse_block(workdir, analysis_settings(tiny), block=BLOCK)  # noqa: E731
    return [dict(name=f"p_e3/{v}_s{seed}", post=post,
                 config=get_config(common.variant_name(v, seed=seed) + (",tiny" if tiny else "")), analyses=())
            for seed in common.SEEDS for v in ("sgd", "dropout")]
