"""E1 at CPU scale: the SME against discrete dropout GD, weak error versus eps and keep_prob.

A two-layer tanh net (5 hidden units, no biases, dropout on the hidden layer) on 8 points of a
tanh teacher, MSE, full-batch dropout GD with shared masks, all from replica 0's initial
parameters. For every (p, eps) in keep_prob_grid x lr_grid, R = 10,000 replicas of dropout GD, of
the order-1, order-2 and R_2-form SMEs (Euler-Maruyama, closed-form Sigma^{1/2}, l = 2 substeps plus
the nested h = eps/4 grid for Richardson extrapolation, quantile-coupled to the discrete masks) and
of dropout-SVAG(4), and the ODE controls ode1/ode2 (same drifts, Sigma = 0), up to SME time T = 2:

    python train.py --config=configs/sme_weak_error.py --workdir=runs/sme_weak_error
    python analyze.py --workdir=runs/sme_weak_error --analyses=weak_error

The second command writes analysis/weak_error/ (the table, fitted orders and PNGs). Costs about 5
minutes on 2 idle CPU cores with 4 SDE processes, more with the two ODEs (25 cells, 775 discrete
steps x 10^4 replicas; 63 min on 2 shared cores); the analysis about 1 min. The
``tiny`` variant (seconds; for tests) keeps the pipeline and shrinks everything:

    python train.py --config=configs/sme_weak_error.py:tiny --workdir=/tmp/sme_tiny

The ``large`` variant runs R = 160,000 replicas per cell on p in {0.8, 0.9} and eps in {0.2, 0.1, 0.05,
0.025} through the batched lockstep (`sme.lockstep_batched`: replica axis in chunks, counter-based
random numbers; the same processes with other random numbers than the default's
per-replica keys); docs/results_e1.md, "Large-R sweep", has its numbers.

Expected (docs/results_e1.md has the measured numbers): the order-1 SME and its ODE control are both
first order at the declared times (t = 1: 1.02 [0.97, 1.08] and 0.99 [0.91, 1.07] at p = 0.9); the
order-2 SME falls about fourfold per halving of eps to the Monte Carlo floor (~1e-5) while its ODE
stays first order (1.05 [0.99, 1.12] at p = 0.8, T = 2); at p = 0.1 dropout GD's second moments
blow up for eps >= 0.05.
"""

from ml_collections import ConfigDict

from configs import base


def get_config(variant: str = "default"):
    if variant not in ("default", "tiny", "large"):
        raise ValueError(f"sme_weak_error variant {variant!r}: expected 'default', 'tiny' or 'large'")
    c = base.get_config()
    c.data.name, c.data.num_points, c.data.input_dim, c.data.teacher_width = "teacher", 8, 2, 3
    c.data.noise_std, c.data.num_test_points = 0.1, 256
    c.model.name, c.model.hidden, c.model.activation = "two_layer", (5,), "tanh"
    c.model.use_bias, c.model.output_bias, c.model.keep_prob, c.model.dropout_layers = False, False, 0.8, "all"
    c.loss, c.objective, c.mask_mode = "mse", "dropout", "shared"
    c.optim.name, c.optim.lr, c.optim.schedule = "sgd", 0.1, "constant"
    c.train.batch_size, c.train.num_steps, c.train.checkpoint_steps = 0, 20, ""
    s = c.sde
    s.enabled, s.variants = True, "order1,order2,ode1,ode2,r2,svag"
    s.diffusion, s.loss_estimator, s.coupling = "closed_form", "closed_form", "quantile"
    s.substeps, s.richardson, s.svag_substeps = 2, True, 4
    s.num_replicas, s.num_batches, s.horizon, s.num_evals = 10_000, 100, 2.0, 20
    s.lr_grid, s.keep_prob_grid = "0.4,0.2,0.1,0.05,0.025", "0.1,0.5,0.8,0.9,0.95"
    # Declared before the run: orders are fitted over eps in [fit_lr_min, fit_lr_max] (the three
    # smallest eps, where eps times the curvature of L_S is small) and, as a second row, over the
    # whole grid; weak errors are read at the fixed times t = 1 (mid) and t = 2 (final T).
    c.analysis.weak_error = ConfigDict(dict(fit_lr_min=0.025, fit_lr_max=0.1, times="1,2"))
    if variant == "large":  # R = 1.6e5 per cell for the order-2 question: the batched lockstep
        s.num_replicas, s.num_batches = 160_000, 400
        s.lr_grid, s.keep_prob_grid = "0.2,0.1,0.05,0.025", "0.8,0.9"
        s.layout, s.chunk_size = "batched", 256  # small chunks keep the step in cache
        c.analysis.weak_error = ConfigDict(dict(fit_lr_min=0.025, fit_lr_max=0.1, times="1,2"))
    if variant == "tiny":
        s.num_replicas, s.num_batches, s.horizon, s.num_evals = 400, 20, 0.4, 4
        s.lr_grid, s.keep_prob_grid, s.variants = "0.2,0.1,0.05", "0.5,0.9", "order1,order2,ode1,svag"
        c.analysis.weak_error = ConfigDict(dict(fit_lr_min=0.05, fit_lr_max=0.2, times="0.2,0.4"))
        s.substeps = 1
        s.num_boot = 200
    return c
