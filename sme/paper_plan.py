"""The experiments of `--reproduce=paper`: names, their config modules and the `--only` selection.

A leaf module shared by the runner (`sme.paper`) and the report (`sme.paper_report`).
"""

from __future__ import annotations

import importlib

# In the order they run: the budget goes to the first ones.
EXPERIMENTS = {
    "P-E5": "configs.paper.p_e5",
    "P-E4": "configs.paper.p_e4",
    "P-E3": "configs.paper.p_e3",
    "P-E6": "configs.paper.p_e6",
    "P-E2": "configs.paper.p_e2",
    "Fashion": "configs.paper.fashion",
    "P-E1": "configs.paper.p_e1",
    "P-E5-lr": "configs.paper.p_e5_lr",
}
TIMINGS = "timings.json"


class PaperError(ValueError):
    """A bad --only selection or an experiment without a config."""


def select(only: str | None) -> list[str]:
    """Experiment names from ``--only`` ("P-E5,P-E4"; case-insensitive), in run order; None = all."""
    if not only:
        return list(EXPERIMENTS)
    lookup = {name.lower(): name for name in EXPERIMENTS}
    wanted = [s.strip() for s in str(only).split(",") if s.strip()]
    unknown = [s for s in wanted if s.lower() not in lookup]
    if unknown or not wanted:
        raise PaperError(f"--only={only!r}: unknown experiment(s) {unknown}; expected names from {list(EXPERIMENTS)}")
    chosen = {lookup[s.lower()] for s in wanted}
    return [name for name in EXPERIMENTS if name in chosen]


def experiment_module(name: str):
    """The config module of experiment ``name``, or None when it has none yet."""
    try:
        return importlib.import_module(EXPERIMENTS[name])
    except ModuleNotFoundError as err:
        if err.name == EXPERIMENTS[name]:
            return None
        raise
