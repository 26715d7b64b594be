"""P-E2 (arXiv 2305.15850): Hessian-variance alignment of dropout noise along training of the P-E3 net.

Paper setting and claim: for nets trained with dropout, the covariance Sigma of the dropout noise is
aligned with the Hessian H of the loss, alpha(H, Sigma) = Tr(H Sigma) / (||H||_F ||Sigma||_F) stays
well above what a randomly oriented Sigma of the same spectrum gives (the Haar null) throughout
training, and the variance of the noise along the Hessian's eigendirections, u_i^T Sigma u_i, grows
with the eigenvalue lambda_i (a positive log-log slope). The paper gives these as figures (no
number for this net), so the claims are the signs: alpha > null, slope > 0, for dropout noise, with
SGD noise as the control.

Our setting: the P-E3 net and data (MNIST, 784-50-50-10 ReLU, no biases, cross-entropy, batch 50,
lr 0.1), trained with dropout SGD (keep_prob 0.8 on both hidden layers, per-sample masks) and
with plain SGD, three seeds each, 12,000 steps (10 epochs: P-E3's loss has left its fast phase by
then), checkpoints at steps 0, 100, 300, 1,000, 3,000, 6,000, 12,000.

    python train.py --config=configs/paper/p_e2.py:dropout,seed=0 --workdir=runs/p_e2/dropout

Analysis settings, fixed here before any run (`ALIGNMENT`, the `alignment` analysis of
sme/analyses/noise.py, matrix-free): H = the Hessian of R_S (no dropout: the same loss for every
noise and both runs) on the first 2,000 training images, its top 20 eigenpairs by Lanczos (order
60) and ||H||_F, Tr H by 32 Hutchinson probes beyond them; the dropout noise Sigma_drop from K = 64
mask gradients, the SGD noise from K = 64 single-example gradients (the same K: like for like);
alpha with the unbiased ||Sigma||_F on both sides; the Haar null of each Sigma (its exact mean and
sd); the projected variance slope against lambda_i over the top 20 eigenpairs with a bootstrap
interval. Seeds give the 95 % intervals of the final-checkpoint numbers.
"""

from configs.paper import common, p_e3

DEFAULTS = dict(seed=0, steps=12000)
PAPER = {
    "alpha_drop": ("alpha(H, Sigma_drop) - Haar null, dropout run, end of training", "> 0 (well above)", None),
    "alpha_sgd": ("alpha(H, Sigma_SGD) - Haar null, SGD run, end of training", "> 0 (the same for SGD)", None),
    "slope_drop": ("log-log slope of u_i^T Sigma_drop u_i vs lambda_i", "> 0", None),
    "slope_sgd": ("log-log slope of u_i^T Sigma_SGD u_i vs lambda_i, SGD run", "> 0", None),
}
BUDGET = 900.0
KERNEL = "Hessian-vector products of R_S on 2,000 images (Lanczos, Hutchinson and Tr(H Sigma): ~250 per checkpoint)"
CHECKPOINTS = "0,100,300,1000,3000,6000,12000"
ALIGNMENT = dict(num_examples=2000, num_masks=64, sgd_examples=64, loss_kind="risk", top_k=20, lanczos_order=60,
                 num_probes=32, num_boot=2000)
TINY_ALIGNMENT = dict(ALIGNMENT, num_examples=100, num_masks=8, sgd_examples=8, top_k=4, lanczos_order=12,
                      num_probes=4, num_boot=200)


def get_config(variant: str = "dropout"):
    name, v, tiny = common.parse_variant(variant, ("dropout", "sgd"), DEFAULTS)
    c = p_e3.get_config(common.variant_name(name, seed=v["seed"], steps=v["steps"], window=0) + (",tiny" if tiny else ""))
    c.train.snapshot_start = -1
    c.train.num_steps = v["steps"] if not tiny else c.train.num_steps
    c.train.checkpoint_steps = CHECKPOINTS if not tiny else f"0,{c.train.num_steps // 2},{c.train.num_steps}"
    c.train.checkpoint_every = c.train.num_steps
    c.train.eval_every = 1000 if not tiny else c.train.num_steps // 2
    return c


def run_name(variant: str, seed: int) -> str:
    return f"p_e2/{variant}_s{seed}"


def get_plan(tiny: bool = False) -> list[dict]:
    """Dropout SGD and SGD for every seed, the alignment analysis at every checkpoint."""
    settings = dict(alignment=TINY_ALIGNMENT if tiny else ALIGNMENT)
    return [dict(name=run_name(v, seed), analyses=("alignment",), steps=dict(alignment="all"), settings=settings,
                 config=get_config(common.variant_name(v, seed=seed) + (",tiny" if tiny else "")))
            for seed in common.SEEDS for v in ("dropout", "sgd")]
