"""End to end: a Flax VGG-9 with explicit-mask dropout trains on CIFAR-format files, then is analysed."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base, cifar_resnet20, cifar_vgg9
from sme import config as config_lib
from sme import io, tensorboard
from sme.testing import cifar_images, write_cifar10, write_cifar_file

TINY_VGG = ["--config.model.channels=(4,4,8,8,8,8)", "--config.model.hidden=(16,16)"]


@pytest.mark.slow
def test_vgg9_trains_on_cifar_files_and_hessian_covariance_run(tmp_path, root):
    data, workdir = str(tmp_path / "cifar-10-batches-bin"), str(tmp_path / "run")
    write_cifar10(data, per_batch=4, num_test=6)  # 20 training images of 32x32x3
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    train = subprocess.run(
        [sys.executable, "train.py", "--config=configs/cifar_vgg9.py", f"--config.data.path={str(tmp_path)}",
         f"--workdir={workdir}", *TINY_VGG, "--config.train.batch_size=4", "--config.train.num_steps=3",
         "--config.train.eval_every=3", "--config.train.checkpoint_steps=0,3", "--config.optim.schedule=constant",
         "--config.log.tensorboard=True"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    saved = json.load(open(os.path.join(workdir, "config.json")))["config"]
    assert saved["model"]["name"] == "vgg9" and saved["data"]["name"] == "cifar10"
    first = io.read_checkpoint(io.checkpoint_path(workdir, 0))
    last = io.read_checkpoint(io.checkpoint_path(workdir, 3))
    kernels = [k for k in first if k.startswith(".params[") and "kernel" in k]
    assert len(kernels) == 9  # 6 conv + 3 dense
    assert all(np.all(np.isfinite(last[k])) for k in kernels)
    assert any(not np.array_equal(first[k], last[k]) for k in kernels)  # it trained
    records = io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 3] and np.isfinite(records[-1]["train/risk"])

    analyse = subprocess.run(
        [sys.executable, "analyze.py", f"--workdir={workdir}", "--analyses=hessian,covariance", "--steps=last",
         "--set=hessian.order=6", "--set=hessian.top_k=2", "--set=hessian.bottom_k=0", "--set=hessian.num_probes=2",
         "--set=hessian.hutchpp_sketch=0", "--set=covariance.num_masks=4", "--set=covariance.top_k=2",
         "--set=covariance.decomposition_masks=0", "--set=covariance.sgd_examples=4",
         "--set=hessian.num_examples=8", "--set=hessian.num_masks=2", "--set=covariance.num_examples=8"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert analyse.returncode == 0, analyse.stderr[-3000:]
    assert "libtpu.so" not in train.stderr + analyse.stderr  # the no-TPU probe line is silenced
    found = {}
    for name in ("hessian", "covariance"):
        (path,) = glob.glob(os.path.join(workdir, "analysis", name, "step_*3.npz"))
        with np.load(path) as f:
            found[name] = {k: f[k] for k in f.files}
    hess, cov = found["hessian"], found["covariance"]
    assert int(hess["num_params"]) == sum(v[0].size for k, v in last.items() if k.startswith(".params["))
    assert hess["top_values"].shape == (2,) and np.all(np.isfinite(hess["top_residuals"]))
    assert hess["top_values"][0] >= hess["top_values"][1]
    assert cov["sigma_eigenvalues"].shape == (2,) and float(cov["sigma_trace"]) > 0  # keep_prob 0.8: noise
    events = tensorboard.read_scalars(os.path.join(workdir, "tensorboard"))  # training and analysis scalars
    assert [s for s, _ in events["train/risk"]] == [0, 3]
    assert events["analysis/hessian/loss_value"] == [(3, pytest.approx(float(hess["loss_value"]), rel=1e-6))]


def test_cifar_configs_build_their_flax_models(tmp_path):
    write_cifar10(str(tmp_path / "c10"))
    (tmp_path / "c100").mkdir()
    for split, n in (("train", 4), ("test", 2)):
        write_cifar_file(str(tmp_path / "c100" / f"{split}.bin"), cifar_images(n, 0), [(1, 42 + k) for k in range(n)])
    configs = {}
    for module, variant, path, classes, sites in ((cifar_vgg9, "cifar10", "c10", 10, 5),
                                                  (cifar_resnet20, "cifar100", "c100", 100, 4)):
        cfg = module.get_config(variant)
        config_lib.check_fields(cfg, base.get_config())
        cfg.data.path, cfg.train.batch_size = str(tmp_path / path), 2
        setup = config_lib.build(cfg)
        assert setup.dataset.num_classes == classes and setup.model.out_dim == classes
        assert len(setup.model.sites) == sites and all(s.keep_prob == cfg.model.keep_prob for s in setup.model.sites)
        configs[variant] = cfg
    configs["cifar10"].model.channels = (4, 4, 8)  # vgg9 takes conv widths in pairs
    with pytest.raises(config_lib.ConfigError, match="model.channels.*two conv widths per block"):
        config_lib.build(configs["cifar10"])
    configs["cifar100"].model.channels = (4, 8)  # two stages: sites 0, 1 and the pooled features 2
    configs["cifar100"].model.dropout_layers = "3"
    with pytest.raises(config_lib.ConfigError, match=r"model.dropout_layers.*\[0, 2\]"):
        config_lib.build(configs["cifar100"])
