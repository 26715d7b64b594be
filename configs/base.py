"""Every config field of `sme`, with its default, units and allowed range.

Experiment configs import this and override a few fields. Run:

    python train.py --config=configs/base.py --workdir=runs/base

Fields (validated at start-up by `sme.config.validate`, before anything is written):

seed                int in [0, 2**63). Root of every key stream (sme.rng); every bit counts.
data.name           digits | mnist | fashion_mnist | npz | relu_1d | tanh_1d | teacher | cifar10 | cifar100.
data.path           directory of IDX files (mnist, fashion_mnist; empty: their installed packages, see
                    sme/data.py) or an .npz file (npz); cifar10/100:
                    the unpacked binary version (data_batch_*.bin; train.bin, test.bin).
data.num_train      keep the first n training examples; 0 = all.
data.num_test       keep the first n test examples; 0 = all.
data.seed           seed of synthetic data (relu_1d, tanh_1d, teacher).
data.num_points     synthetic training points (>= 1).
data.num_test_points synthetic test points (>= 1).
data.input_dim      teacher input dimension (>= 1).
data.teacher_width  teacher hidden width (>= 1).
data.noise_std      synthetic label noise std (>= 0).
model.name          mlp | two_layer | cnn | vgg9 | resnet20 (Flax, sme/flax_models.py).
model.hidden        hidden widths, tuple of ints >= 1 (two_layer: exactly one).
model.activation    relu | tanh | gelu | sigmoid | softplus | linear.
model.use_bias      hidden-layer biases.
model.output_bias   readout bias.
model.keep_prob     the papers' p, in (0, 1]; 1 = no dropout. Never a drop rate.
model.dropout_layers which sites get dropout: "all", "last", "none" or indices "0,2"; "0:0.8,1:0.5"
                    gives each listed site its own keep_prob (others keep none).
model.init_scale    multiplies the He/LeCun init std (> 0).
model.channels      cnn conv channels per block (each conv3x3 -> act -> maxpool2 -> dropout);
                    vgg9: two per block; resnet20: one per stage (resnet20 ignores model.hidden).
model.input_shape   cnn/vgg9/resnet20 input (height, width, channels); must multiply to the data's in_dim.
loss                mse (½||f - y||², one-hot targets for classes) | cross_entropy.
objective           r_s | dropout | l1 | l2 | l3 | l4 | l1_r2 | drop_r2 (see sme/losses.py).
penalty_lr          lambda of the (lambda/4)||grad R^drop_S||² penalty (l2, l3, l1_r2, drop_r2); -1 = optim.lr.
mask_mode           per_sample (nn.Dropout) | shared (one mask per batch, the papers' formulas).
optim.name          sgd | momentum | adam.
optim.lr            learning rate eps > 0 (SME time t = N eps).
optim.momentum      momentum in [0, 1) (momentum only).
optim.b1, optim.b2  Adam betas in [0, 1).
optim.schedule      constant | cosine | warmup_cosine | step.
optim.warmup_steps  linear warm-up steps (warmup_cosine), >= 0.
optim.decay_factor  step schedule: lr multiplied by this at each boundary, in (0, 1].
optim.decay_every   step schedule: boundary every this many steps (>= 1).
optim.weight_decay  decoupled L2 weight decay >= 0.
train.num_steps     optimisation steps N (>= 1).
train.batch_size    minibatch size; 0 = full batch (dropout GD). Must be <= num_train.
train.num_replicas  R seeds trained at once by vmap (>= 1), sharded over devices if several.
train.share_init    all replicas start from replica 0's initial parameters (for SME comparisons).
train.eval_every    steps between metric lines in metrics.jsonl (>= 1).
train.checkpoint_steps  steps kept for analysis: "log:K" (K log-spaced), "linear:K", "0,100,1000"
                    or "" (none). The final step is always kept.
train.checkpoint_every  steps between rolling "latest" checkpoints for resuming (>= 1).
train.log_every_secs    seconds between progress lines (> 0).
train.dtype         float32 | float64.
train.snapshot_start    first step of the trajectory-snapshot window (-1 = no snapshots); the
                    raveled parameters at snapshot_start + k * snapshot_every go to snapshots.npz.
train.snapshot_every    steps between snapshots (>= 1).
log.tensorboard     also write metrics.jsonl's scalars to <workdir>/tensorboard (needs the
                    tensorboard extra: pip install -e '.[tensorboard]'). Changing it never
                    blocks resuming a run.
analysis.*          per-analysis settings used by analyze.py (see each analysis' docstring),
                    e.g. analysis.hessian.top_k; empty here on purpose. The analyses' defaults live
                    beside them (the *_DEFAULTS of sme/analyses/*.py, listed by `analyze.py --list`)
                    rather than in this file: a run's config.json fixes what was trained, and a
                    changed analysis default must neither alter it nor block resuming the run.
sde.enabled         run the SME lockstep simulation (sme/sweep.py) instead of training: discrete
                    full-batch dropout GD beside its SDEs, R replicas each. Needs optim.name=sgd,
                    constant schedule, no weight decay, objective=dropout, train.batch_size=0.
sde.variants        comma-separated subset of order1, order2, r2 (SME drifts), svag, and ode1, ode2
                    (the no-diffusion controls: the order-1/order-2 drift with Sigma = 0).
sde.diffusion       auto | closed_form (MSE, readout-only dropout) | exact (2**m masks) | masks (K).
sde.loss_estimator  how L_S is computed in the drift: auto | closed_form | exact | masks.
sde.num_masks       K masks per substep for the masks diffusion/estimator (>= 2; covariance / (K - 1)).
sde.substeps        l Euler-Maruyama substeps per discrete step, h = eps / l (>= 1).
sde.richardson      also run each SDE on the grid h = eps/(2l) fed the same Brownian path and report
                    2 g(h/2) - g(h): removes Euler-Maruyama's O(h) weak error.
sde.svag_substeps   l of dropout-SVAG(l) (>= 1).
sde.r2_trace        grad Tr Sigma in the r2 drift: sample (unbiased one-sample estimate) | exact.
sde.coupling        common random numbers: none | variants (SDE variants share noise) | quantile
                    (also ties the SDE unit noise to the discrete masks; exact/closed_form diffusion).
sde.num_replicas    R replicas of every process (>= 2, a multiple of sde.num_batches).
sde.num_batches     B replica groups whose means feed the bootstrap (>= 2).
sde.horizon         T in SME time t = N eps (>= 0; 0 = train.num_steps * optim.lr); T/eps must be
                    an integer number of steps for every eps.
sde.lr_grid         comma-separated eps values, e.g. "0.4,0.2,0.1"; "" = optim.lr.
sde.keep_prob_grid  comma-separated p values in (0, 1); "" = model.keep_prob.
sde.num_evals       logged times per run, evenly spaced over [0, T] (>= 1); the weak error is the
                    max over these.
sde.num_probes      test inputs whose outputs are test functions (>= 0).
sde.eval_num_masks  masks of the Monte Carlo L_S test function when neither closed form nor
                    enumeration applies (>= 2).
sde.max_enumerated_units  largest m for exact enumeration (1..20).
sde.num_boot        bootstrap draws of the weak-error intervals (>= 100).
sde.layout          replica (every replica its own keys, vmapped: any model) | batched (counter-based
                    draws, one hash call per step and purpose, chunked: MLPs with one hidden layer, shared masks,
                    mse, closed_form diffusion and loss; sme/lockstep_batched.py). Same law, other numbers.
sde.chunk_size      replicas per chunk of the batched layout (any positive integer); no effect on results.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.data = ConfigDict(dict(
        name="digits", path="", num_train=0, num_test=0, seed=0, num_points=32,
        num_test_points=256, input_dim=4, teacher_width=4, noise_std=0.0))

    c.model = ConfigDict(dict(
        name="mlp", hidden=(128, 128), activation="relu", use_bias=True, output_bias=True,
        keep_prob=0.8, dropout_layers="all", init_scale=1.0, channels=(16,), input_shape=(8, 8, 1)))

    c.loss = "cross_entropy"
    c.objective = "dropout"
    c.penalty_lr = -1.0
    c.mask_mode = "per_sample"

    c.optim = ConfigDict(dict(
        name="sgd", lr=0.1, momentum=0.9, b1=0.9, b2=0.999, schedule="constant",
        warmup_steps=0, decay_factor=0.5, decay_every=1000, weight_decay=0.0))

    c.train = ConfigDict(dict(
        num_steps=3000, batch_size=64, num_replicas=1, share_init=False, eval_every=250,
        checkpoint_steps="log:8", checkpoint_every=1000, log_every_secs=5.0, dtype="float32",
        snapshot_start=-1, snapshot_every=1))

    c.log = ConfigDict(dict(tensorboard=False))

    c.analysis = ConfigDict()

    c.sde = ConfigDict(dict(
        enabled=False, variants="order1,order2,r2,svag", diffusion="auto", loss_estimator="auto", num_masks=16,
        substeps=1, richardson=False, svag_substeps=4, r2_trace="sample", coupling="variants", num_replicas=1000,
        num_batches=100, horizon=0.0, lr_grid="", keep_prob_grid="", num_evals=20, num_probes=3,
        eval_num_masks=256, max_enumerated_units=12, num_boot=1000, layout="replica", chunk_size=4096))
    return c
