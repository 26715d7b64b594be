"""P-E4 (arXiv 2207.05952 Fig. 11a, Table 1 row 1): dropout vs no dropout on MNIST, flatness.

Paper setting: MNIST (60,000 training images), FNN 784-1024-1024-10, ReLU, cross-entropy, Adam at
lr 1e-4; dropout keep_prob 0.8 after the first hidden layer and 0.5 after the second, against the
same net without dropout. Paper numbers: test accuracy 98.7 % with dropout vs 98.1 % without;
dropout finds flatter minima (1-D profiles, Fig. 11a).

    python train.py --config=configs/paper/p_e4.py:dropout,seed=0 --workdir=runs/p_e4/dropout
    python train.py --config=configs/paper/p_e4.py:plain,seed=0   --workdir=runs/p_e4/plain

Flatness is compared like-for-like: the Hessian of the same loss, R_S (no dropout) on the same
first 2,000 training images, for both nets (lambda_max by Lanczos, Tr H by Hutchinson), and
filter-normalised 1-D profiles of R_S on the same subset.

Budget choices (2 CPU cores shared with other jobs), fixed before the runs: batch 128 (the
paper's batch size is not in our source), 8,000 steps = 17 epochs (a step takes ~15 ms on 2
quiet cores; an earlier run on shared cores stopped at 2,000 steps = 4.3 epochs and left both
nets 1-2 pp below the paper; the report's test-accuracy curves show where each one is), three seeds per variant
(separate runs). Hessian of R_S on the first 1,000 training images: Lanczos order 20 for
lambda_max, 20 Hutchinson probes for Tr H (standard error reported); profiles: 3
filter-normalised directions x 17 points on [-1, 1].
"""

from configs import base
from configs.paper import common

DEFAULTS = dict(seed=0, steps=8000)
PAPER = {
    "acc": ("test accuracy, dropout - no dropout", "98.7 vs 98.1 % (+0.6 pp)", (0.6, 0.6)),
    "lambda_max": ("lambda_max of R_S: dropout / no dropout", "< 1 (flatter with dropout, Fig. 11a)", None),
    "trace": ("Tr H of R_S: dropout / no dropout", "< 1 (flatter with dropout)", None),
}
BUDGET = 1000.0
KERNEL = "the 1024 x 1024 and 1024 x 784 dense matmuls of the batch-128 Adam steps; then Hessian-vector products on 1,000 images"
FLAT_EXAMPLES = 1000  # the same training subset for both nets' Hessians and profiles
HESSIAN = dict(loss_kind="risk", num_examples=FLAT_EXAMPLES, chunk_size=500, order=20, top_k=3, bottom_k=0,
               num_probes=20, hutchpp_sketch=0)
PROFILE = dict(objective="risk", num_examples=FLAT_EXAMPLES, num_directions=3, num_points=17, radius=1.0)


def get_plan(tiny: bool = False) -> list[dict]:
    """Both variants for every seed, each with the Hessian and the profiles at its last step."""
    hessian = dict(HESSIAN, num_examples=50, chunk_size=0, order=8, num_probes=4) if tiny else HESSIAN
    profile = dict(PROFILE, num_examples=50, num_directions=2, num_points=5) if tiny else PROFILE
    return [dict(name=f"p_e4/{v}_s{seed}",
                 config=get_config(common.variant_name(v, seed=seed) + (",tiny" if tiny else "")),
                 analyses=("hessian", "profile"), settings=dict(hessian=hessian, profile=profile))
            for seed in common.SEEDS for v in ("dropout", "plain")]


def get_config(variant: str = "dropout"):
    name, v, tiny = common.parse_variant(variant, ("dropout", "plain"), DEFAULTS)
    c = base.get_config()
    c.seed = v["seed"]
    c.data.name = "mnist"
    c.model.hidden = (1024, 1024)
    c.model.keep_prob = 1.0
    c.model.dropout_layers = "0:0.8,1:0.5" if name == "dropout" else "none"
    c.loss = "cross_entropy"
    c.objective = "dropout" if name == "dropout" else "r_s"
    c.mask_mode = "per_sample"
    c.optim.name = "adam"
    c.optim.lr = 1e-4
    c.train.batch_size = 128
    c.train.num_steps = v["steps"]
    c.train.eval_every = 1000
    c.train.checkpoint_steps = "linear:2"
    c.train.checkpoint_every = 2000
    c.train.log_every_secs = 30.0
    if tiny:
        common.shrink(c, steps=20)
    return c
