"""The plan of `python analyze.py --reproduce=SCALE`: which runs to train and what to analyse.

    python analyze.py --reproduce=cpu  --report=reports/cpu    # E2-E6 at CPU scale (about 40 min, 2 cores)
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


def _settings(cfg, names, tiny_overrides: dict) -> dict:
    """Each analysis' settings from the run config's analysis block (fixed before the run), then the
    tiny plan's shrinking overrides."""
    return {name: {**(cfg.analysis[name].to_dict() if name in cfg.analysis else {}), **tiny_overrides.get(name, {})}
            for name in names}


def get_plan(scale: str = "cpu") -> list[dict]:
    """Runs as dicts: name, config (ConfigDict), analyses, steps ("all" | "last" | "0,100" or a dict
    analysis -> such a spec), settings (analysis -> {setting: value}), and optionally replica
    (0 | "all", or a dict analysis -> such a value; default 0)."""
    if scale not in ("cpu", "tiny"):
        raise ValueError(f"--reproduce={scale!r}: expected 'cpu' or 'tiny'")
    tiny = scale == "tiny"
    small = {}
    if tiny:
        sens = dict(num_components=6, fit_components=5, sensitivity_components="4,6", num_boot=200)
        hess = dict(order=20, top_k=3, bottom_k=1, num_probes=8)
        small = dict(alignment=dict(num_masks=16, sgd_examples=16, top_k=8, num_probes=8, lanczos_order=20),
                     covariance=dict(num_masks=16, sgd_examples=32, top_k=8),
                     flatness=dict(sens, num_masks=64), trajectory_flatness=sens,
                     hessian=hess, hessian_modified=dict(hess, num_masks=2),
                     profile=dict(num_directions=2, num_points=11), fisher=dict(order=10, top_k=2))
    else:
        small = dict(profile=dict(num_directions=4, num_points=41))
    e2 = {v: e2_noise.get_config(v) for v in ("dropout", "sgd")}
    e4 = {v: e4_flatness.get_config(v) for v in ("dropout", "plain")}
    e2_analyses = {"dropout": ("alignment", "covariance", "flatness", "trajectory_flatness"),
                   "sgd": ("alignment", "flatness", "trajectory_flatness")}
    e4_analyses = ("hessian", "hessian_modified", "profile")
    plan = [
        # alpha along training; the flatness fits only at the end (trajectory data do not depend on it)
        *(dict(name=f"e2/{v}", config=e2[v], analyses=e2_analyses[v],
               steps=dict(alignment="all" if v == "dropout" else "last", covariance="all", flatness="last",
                          trajectory_flatness="last"),
               settings=_settings(e2[v], e2_analyses[v], small)) for v in ("dropout", "sgd")),
        # every seed's Hessian (R_S and L_S); the profiles of seed 0
        *(dict(name=f"e4/{v}", config=e4[v], steps="last", analyses=e4_analyses,
               replica=dict(hessian="all", hessian_modified="all", profile=0),
               settings=_settings(e4[v], e4_analyses, small)) for v in ("dropout", "plain")),
        *(dict(name=f"e5/{v}", config=e5_r1.get_config(v), steps="last", analyses=(), settings={})
          for v in ("dropout", "r1", "rs")),
        *(dict(name=f"e6/p{p}", config=e6_fisher.get_config(p), steps="last", analyses=("fisher",),
               settings=_settings(e6_fisher.get_config(p), ("fisher",), small)) for p in E6_KEEP_PROBS),
    ]
    if tiny:
        for entry in plan:
            _tiny(entry["config"])
            if entry["name"].startswith("e2/"):
                entry["config"].model.hidden = (8, 8)
            if entry["name"].startswith("e4/"):
                entry["config"].train.num_replicas = 2
    return plan
