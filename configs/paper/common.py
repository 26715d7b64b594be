"""Shared helpers of the paper-scale configs: variant strings and the ``tiny`` shrink.

A variant string is comma-separated: a name, then ``key=value`` items and optional
``tiny``; e.g. ``python train.py --config=configs/paper/p_e5.py:dropout,p=0.7,seed=1``.
"""

from __future__ import annotations

SEEDS = (0, 1, 2)  # three seeds per compared setting: 95 % t-intervals need n >= 3


def parse_variant(variant: str, names: tuple[str, ...], defaults: dict) -> tuple[str, dict, bool]:
    """'dropout,p=0.7,seed=1,tiny' -> ('dropout', {'p': 0.7, 'seed': 1, ...defaults}, True)."""
    items = [s.strip() for s in str(variant).split(",") if s.strip()]
    name = items.pop(0) if items and "=" not in items[0] and items[0] != "tiny" else names[0]
    if name not in names:
        raise ValueError(f"variant {name!r}: expected one of {names}")
    tiny = "tiny" in items
    values = dict(defaults)
    for item in (i for i in items if i != "tiny"):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"variant item {item!r}: expected KEY=VALUE with KEY in {sorted(defaults)}")
        values[key] = type(defaults[key])(value)
    return name, values, tiny


def variant_name(name: str, **values) -> str:
    return ",".join([name] + [f"{k}={v}" for k, v in values.items()])


def shrink(c, *, num_train: int = 200, num_test: int = 200, steps: int = 30, hidden: int = 16):
    """The ``tiny`` variant: same code path, seconds to run (for the test suite)."""
    c.data.num_train = min(c.data.num_train or num_train, num_train)
    c.data.num_test = num_test
    c.model.hidden = tuple(min(w, hidden) for w in c.model.hidden)
    c.train.num_steps = steps
    c.train.eval_every = steps // 2
    c.train.checkpoint_steps = f"0,{steps // 2}"
    c.train.checkpoint_every = steps
    if c.train.batch_size > 0:
        c.train.batch_size = min(c.train.batch_size, 20)
    if c.train.snapshot_start >= 0:
        c.train.snapshot_start = steps // 2
    return c
