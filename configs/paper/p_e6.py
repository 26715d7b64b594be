"""P-E6 (Kimura & Hino, arXiv 2206.10936): dropout as a Fisher-information regulariser, at P-E5 scale.

Setting: the P-E5 net (MNIST-1k, 784-1000-10, ReLU, MSE, full-batch GD at eps = 0.05, 2,000 steps,
dropout after the hidden layer), trained with dropout at keep_prob 0.6, 0.7, 0.8, 0.9 and on R_S
(no dropout, p = 1). At each trained net: traces and top eigenvalues of the empirical and true
Fisher (for MSE the true Fisher is the Gauss-Newton matrix) over the 1,000 training images, and
R_1 beside its Fisher form ((1 - p)/(2p)) sum_j theta_j^2 F_jj (an identity for MSE with
readout-only dropout, so a check of both codes rather than a finding). The paper's reading: the
Fisher information of the trained net shrinks as dropout strengthens (smaller p); it gives no
number for this net.

The same plan trains the keep_prob sweep of P-E5 (dropout and R_S + R_1 at p = 0.6, 0.7, 0.9,
seed 0) and P-E5's R_S + R~_2 run, whose accuracies P-E5's report tabulates. Run names are
P-E5's, so nets are shared.
Budget: one seed per p (the sweep is a trend over p, not a paired comparison).
"""

from configs.paper import p_e5

PAPER = {
    "trend": ("Fisher trace vs keep_prob", "grows as p -> 1 (less dropout)", None),
    "identity": ("R_1 = ((1-p)/(2p)) sum theta_j^2 F_jj", "identity (MSE, readout dropout)", None),
}
KEEP_PROBS = (0.6, 0.7, 0.8, 0.9)
BUDGET = 900.0
KERNEL = "full-batch GD steps of the sweep nets; then per-example Jacobians (10 x 795k) for the exact Fisher traces"
FISHER = dict(num_examples=1000, chunk_size=0, trace_chunk_size=4, kinds="empirical,true", order=20, top_k=3)


def get_plan(tiny: bool = False) -> list[dict]:
    """Dropout at each p (with fisher), R_S + R_1 at the sweep p's, and R_S (with fisher)."""
    fisher = dict(FISHER, num_examples=50, order=5, top_k=2) if tiny else FISHER
    plan = []
    for p in KEEP_PROBS:
        plan.append(dict(p_e5.entry("dropout", p, 0, tiny), analyses=("fisher",), settings=dict(fisher=fisher)))
    plan.append(dict(p_e5.entry("rs", p_e5.KEEP_PROB, 0, tiny), analyses=("fisher",), settings=dict(fisher=fisher)))
    plan += [p_e5.entry("l1", p, 0, tiny) for p in KEEP_PROBS if p != p_e5.KEEP_PROB]
    return plan + [p_e5.entry("l2", p_e5.KEEP_PROB, 0, tiny)]  # P-E5's R_S + R~_2, the costliest, last
