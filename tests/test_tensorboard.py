"""Live logging: TensorBoard events equal metrics.jsonl; the progress line's rate excludes compilation."""

import logging
import os

import numpy as np
import pytest

from configs import smoke
from sme import io, tensorboard
from sme.train import loop

pytest.importorskip("tensorboardX")


def _config(**train):
    cfg = smoke.get_config()
    cfg.train.num_steps, cfg.train.eval_every, cfg.train.checkpoint_steps = 20, 5, "0,20"
    cfg.train.update(train)
    return cfg


def test_events_hold_the_same_scalars_as_metrics_jsonl(tmp_path):
    cfg = _config()
    cfg.log.tensorboard = True
    loop.run(cfg, str(tmp_path))
    records = io.read_jsonl(str(tmp_path / "metrics.jsonl"))
    scalars = tensorboard.read_scalars(str(tmp_path / "tensorboard"))
    expected = {}
    for record in records:
        for tag, value in record.items():
            if tag not in ("step", "time"):
                expected.setdefault(tag, []).append((record["step"], value))
    assert set(scalars) == set(expected) and "test/acc" in scalars and "train/objective" in scalars
    for tag, points in expected.items():
        steps, values = zip(*points)
        assert [s for s, _ in scalars[tag]] == list(steps), tag
        # Event files store float32 (simple_value): equal to the JSON float64 up to float32 rounding.
        np.testing.assert_allclose([v for _, v in scalars[tag]], values, rtol=2**-23, err_msg=tag)


def test_off_by_default_writes_nothing(tmp_path):
    cfg = _config()
    assert cfg.log.tensorboard is False
    loop.run(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / "tensorboard")
    writer = tensorboard.open_writer(str(tmp_path), enabled=False)
    writer.write({"step": 1, "train/risk": 0.5})
    writer.close()
    assert not os.path.exists(tmp_path / "tensorboard")


def test_first_progress_line_reports_compilation_not_an_eta(tmp_path, caplog):
    cfg = _config(log_every_secs=1e-6)  # a progress line after every chunk
    with caplog.at_level(logging.INFO):
        loop.run(cfg, str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) >= 2
    assert "first chunk with compilation" in lines[0] and "ETA" not in lines[0]
    assert all("steps/s | ETA" in line for line in lines[1:])


def test_tpu_probe_filter_drops_only_the_no_libtpu_message():
    from sme.probe import quiet_tpu_probe

    quiet_tpu_probe()
    quiet_tpu_probe()  # idempotent
    logger = logging.getLogger("jax._src.xla_bridge")
    absent = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
              "cannot open shared object file: No such file or directory")
    broken = "Unable to initialize backend 'tpu': INTERNAL: TPU initialization failed: chips busy"
    other = "Unable to initialize backend 'cuda': no CUDA devices"
    kept = [m for m in (absent, broken, other)
            if logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, m, None, None))]
    assert kept == [broken, other]


def test_analysis_summary_scalars_become_events(tmp_path):
    summary = {"__sha256__": "ab", "failures": [],
               "hessian": {"3": {"loss_value": 2.5, "num_params": 10, "loss_kind": "risk", "settings": {"k": 1},
                                 "trace_hutchpp": None},
                           "7": {"loss_value": 1.25, "num_params": 10}}}
    assert tensorboard.write_summary(str(tmp_path), summary) == 4
    scalars = tensorboard.read_scalars(str(tmp_path / "tensorboard"))
    assert scalars == {"analysis/hessian/loss_value": [(3, 2.5), (7, 1.25)],
                       "analysis/hessian/num_params": [(3, 10.0), (7, 10.0)]}
