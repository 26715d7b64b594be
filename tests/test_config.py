import os
import subprocess
import sys

import pytest

from configs import base, smoke
from sme import config as config_lib

BAD = [
    ("model.keep_prob", 0.0, "keep probability p must be in \\(0, 1\\]"),
    ("model.keep_prob", 1.5, "keep probability p must be in \\(0, 1\\]"),
    ("optim.lr", 0.0, "learning rate must be finite and > 0"),
    ("optim.lr", -0.1, "learning rate must be finite and > 0"),
    ("model.hidden", (32, 0), "every width >= 1"),
    ("model.name", "resnet", "must be one of \\('mlp', 'two_layer', 'cnn', 'vgg9', 'resnet20'\\)"),
    ("data.name", "cifar", "must be one of"),
    ("optim.name", "lbfgs", "must be one of \\('sgd', 'momentum', 'adam'\\)"),
    ("train.batch_size", 301, "must be <= the 300 training examples"),
    ("train.num_steps", 0, "must be >= 1"),
    ("mask_mode", "per_batch", "must be one of \\('shared', 'per_sample'\\)"),
    ("objective", "l9", "must be one of"),
    ("loss", "hinge", "must be one of"),
    ("model.dropout_layers", "0,7", "indices must be in \\[0, 0\\]"),
    ("train.checkpoint_steps", "log:x", "use 'log:K'"),
    ("train.checkpoint_steps", "0,99999", "outside \\[0, num_steps=60\\]"),
    ("optim.momentum", 1.0, "must be in \\[0, 1\\)"),
    ("train.dtype", "float16", "must be one of"),
]


def _set(cfg, field, value):
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize("field,value,message", BAD)
def test_bad_values_name_field_value_and_range(field, value, message):
    cfg = smoke.get_config()
    _set(cfg, field, value)
    with pytest.raises(config_lib.ConfigError, match=f"config.{field.split('.')[0]}"):
        config_lib.build(cfg)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.build(cfg)


def test_problem_specific_checks():
    cfg = smoke.get_config()
    cfg.objective = "l1"  # closed form needs mse
    with pytest.raises(config_lib.ConfigError, match="mse loss only"):
        config_lib.build(cfg)
    cfg = smoke.get_config()
    cfg.data.name, cfg.data.num_train = "relu_1d", 0  # regression data with cross-entropy
    cfg.train.batch_size = 0
    with pytest.raises(config_lib.ConfigError, match="regression set: use mse"):
        config_lib.build(cfg)
    cfg = smoke.get_config()
    cfg.data.name, cfg.data.path = "npz", "/nonexistent/file.npz"
    with pytest.raises(config_lib.ConfigError, match="/nonexistent/file.npz: file not found"):
        config_lib.build(cfg)
    cfg = smoke.get_config()
    cfg.model.name, cfg.model.input_shape = "cnn", (8, 4, 1)
    with pytest.raises(config_lib.ConfigError, match="must multiply to the data's input size 64"):
        config_lib.build(cfg)


def test_unknown_and_missing_fields():
    cfg = smoke.get_config()
    cfg.model.widht = 3
    with pytest.raises(config_lib.ConfigError, match="config.model.widht"):
        config_lib.check_fields(cfg, base.get_config())
    config_lib.check_fields(smoke.get_config(), base.get_config())


def test_checkpoint_step_specs():
    assert config_lib.parse_checkpoint_steps("log:4", 1000) == [0, 1, 10, 100, 1000]
    assert config_lib.parse_checkpoint_steps("linear:2", 10) == [0, 5, 10]
    assert config_lib.parse_checkpoint_steps("", 7) == [7]


def test_train_py_rejects_bad_config_before_writing(tmp_path, root):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "train.py"), f"--config={root}/configs/smoke.py",
         f"--workdir={workdir}", "--config.model.keep_prob=1.5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "config.model.keep_prob=1.5 is invalid" in proc.stderr
    assert not workdir.exists()  # nothing written


def test_sde_chunk_size_any_positive_integer():
    # The batched lockstep's random numbers are counter-based (step, replica, index), so any chunk
    # size gives the same numbers and only non-positive or non-integer sizes are refused.
    from configs import sme_weak_error

    cfg = sme_weak_error.get_config("tiny")
    cfg.sde.layout, cfg.sde.chunk_size = "batched", 100
    assert config_lib.build(cfg).sweep.chunk_size == 100
    for bad in (0, -64):  # (a float is refused by ConfigDict itself)
        cfg.sde.chunk_size = bad
        with pytest.raises(config_lib.ConfigError, match="config.sde.chunk_size.*must be a positive integer"):
            config_lib.build(cfg)
