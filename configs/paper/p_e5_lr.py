"""P-E5 at the paper's eps = 5e-3 (arXiv 2207.05952 Figs. 2 and 12): dropout, R_S + R_1 and R_S.

Paper setting and numbers: as P-E5 (`configs/paper/p_e5.py`: MNIST-1k, 784-1000-10 ReLU, MSE,
full-batch GD, dropout after the hidden layer at keep_prob 0.8), at the learning rate eps = 5e-3;
paper: dropout and R_S + R_1 about 88-89 %, R_S about 79 %.

Budget choice, fixed before the run: 4,000 steps (SME time t = 20; the eps = 0.05 runs of P-E5
train to t = 75, where their test accuracy has plateaued). A step of this net takes ~37 ms on one
core, and the 9 runs (R_S + R_1 costs two passes) take ~30 core-minutes at 4,000 steps; the
~12,000 steps that t = 60 would need take ~90. The test accuracy is NOT at its plateau at step
4,000: the comparison is between objectives at the same step and time.
Seed-major order (seed 0 of all three objectives first); the seeds that finish give the intervals.

    python train.py --config=configs/paper/p_e5_lr.py:rs,seed=0 --workdir=runs/p_e5_lr/rs
"""

from configs.paper import common, p_e5

EPS = 5e-3
DEFAULTS = dict(seed=0, steps=4000)
PAPER = p_e5.PAPER
BUDGET = 1800.0
KERNEL = p_e5.KERNEL
OBJECTIVES = ("dropout", "rs", "l1")  # the dropout - R_S gap first: it is the headline claim


def run_name(objective: str, seed: int) -> str:
    return f"p_e5_lr/{objective}_s{seed}"


def get_config(variant: str = "dropout"):
    name, v, tiny = common.parse_variant(variant, OBJECTIVES, DEFAULTS)
    c = p_e5.get_config(common.variant_name(name, p=p_e5.KEEP_PROB, seed=v["seed"], lr=EPS, steps=v["steps"])
                        + (",tiny" if tiny else ""))
    if not tiny:
        c.train.eval_every = 500
        c.train.checkpoint_steps = ""
        c.train.checkpoint_every = v["steps"]
    return c


def get_plan(tiny: bool = False) -> list[dict]:
    return [dict(name=run_name(o, seed), analyses=(),
                 config=get_config(common.variant_name(o, seed=seed) + (",tiny" if tiny else "")))
            for seed in common.SEEDS for o in OBJECTIVES]
