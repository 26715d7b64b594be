"""The plan of `python analyze.py --reproduce=SCALE`: which runs to train and what to analyse.

    python analyze.py --reproduce=cpu  --report=reports/cpu    # E2-E6 at CPU scale (< 30 min, 2 cores)
    python analyze.py --reproduce=tiny --report=/tmp/tiny      # the same pipeline in about a minute

Each entry trains one config (resuming if its run directory already holds it) and runs the listed
analyses on its checkpoints (``steps``: one spec for all, or one per analysis); `sme.reproduce` then writes the report (figures + report.json +
report.md). ``tiny`` shrinks every run (steps, widths, data) so the whole pipeline is testable.
"""

from configs import e2_noise, e4_flatness, e5_r1, e6_fisher

E6_KEEP_PROBS = ("0.5", "0.6", "0.7", "0.8", "0.9", "1.0")


def _tiny(cfg):
    cfg.data.num_train = min(cfg.data.num_train or 300, 300)
    cfg.model.hidden = tuple(min(w, 16) for w in cfg.model.hidden)
    cfg.train.num_steps = 40
    cfg.train.eval_every = 20
    cfg.train.checkpoint_steps = "0,20"
    if cfg.train.batch_size > 0:
        cfg.train.batch_size = min(cfg.train.batch_size, 32)
    if cfg.train.snapshot_start >= 0:
        cfg.train.snapshot_start = 10
    return cfg


def get_plan(scale: str = "cpu") -> list[dict]:
    """Runs as dicts: name, config (ConfigDict), analyses, steps ("all" | "last" | "0,100" or a dict
    analysis -> such a spec), settings (analysis -> {setting: value})."""
    if scale not in ("cpu", "tiny"):
        raise ValueError(f"--reproduce={scale!r}: expected 'cpu' or 'tiny'")
    tiny = scale == "tiny"
    light = dict(num_masks=16, sgd_examples=32, top_k=8, num_probes=8, lanczos_order=20) if tiny else {}
    hessian = dict(order=20, top_k=3, bottom_k=1, num_probes=8, hutchpp_sketch=4) if tiny else dict(top_k=5)
    flat = dict(num_masks=16, num_components=6, num_boot=200) if tiny else dict(num_masks=128, num_components=30)
    traj = dict(num_components=6, num_boot=200) if tiny else dict(num_components=30)
    profile = dict(num_directions=2, num_points=11) if tiny else dict(num_directions=4, num_points=41)
    plan = [
        dict(name="e2/dropout", config=e2_noise.get_config("dropout"),
             # alpha along training; the flatness fits only at the end (trajectory data do not depend on it)
             steps=dict(alignment="all", covariance="all", flatness="last", trajectory_flatness="last"),
             analyses=("alignment", "covariance", "flatness", "trajectory_flatness"),
             settings=dict(alignment=light, covariance=dict(num_masks=16, sgd_examples=32, top_k=8) if tiny else {},
                           flatness=flat,
                           trajectory_flatness=traj)),
        dict(name="e2/sgd", config=e2_noise.get_config("sgd"), steps="last",
             analyses=("alignment", "flatness", "trajectory_flatness"),
             settings=dict(alignment=light, flatness=dict(flat, noise="minibatch"), trajectory_flatness=traj)),
        *(dict(name=f"e4/{v}", config=e4_flatness.get_config(v), steps="last", analyses=("hessian", "profile"),
               settings=dict(hessian=hessian, profile=profile)) for v in ("dropout", "plain")),
        *(dict(name=f"e5/{v}", config=e5_r1.get_config(v), steps="last", analyses=(), settings={})
          for v in ("dropout", "r1", "rs")),
        *(dict(name=f"e6/p{p}", config=e6_fisher.get_config(p), steps="last", analyses=("fisher",),
               settings=dict(fisher=dict(order=10, top_k=2) if tiny else {})) for p in E6_KEEP_PROBS),
    ]
    if tiny:
        for entry in plan:
            _tiny(entry["config"])
            if entry["name"].startswith("e2/"):
                entry["config"].model.hidden = (8, 8)
    return plan
