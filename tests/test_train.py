import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from sme import dropout, io, losses, rng
from sme import config as config_lib
from sme.train import loop
from sme.train.step import Sampler, make_advance, make_replica_step, make_train_step, train_keys

VOLATILE = ("time", "steps_per_sec")


def _metrics(workdir):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def _final(workdir):
    step, path = io.list_checkpoints(workdir)[-1]
    return step, io.read_checkpoint(path)


def _tiny_regression():
    cfg = smoke.get_config()
    cfg.data.name, cfg.data.num_train, cfg.data.num_points = "relu_1d", 0, 8
    cfg.model.name, cfg.model.hidden, cfg.model.keep_prob = "two_layer", (5,), 0.5
    cfg.model.activation, cfg.model.use_bias, cfg.model.output_bias = "tanh", False, False
    cfg.loss, cfg.mask_mode, cfg.train.batch_size = "mse", "shared", 0
    cfg.optim.lr, cfg.train.num_steps, cfg.train.checkpoint_steps = 0.3, 1, "0,1"
    return cfg


def test_one_step_matches_hand_written_dropout_gd(tmp_path):
    cfg = _tiny_regression()
    loop.run(cfg, str(tmp_path))
    before = io.read_checkpoint(io.checkpoint_path(str(tmp_path), 0))
    after = io.read_checkpoint(io.checkpoint_path(str(tmp_path), 1))
    w = before[".params['hidden'][0]['w']"][0].astype(np.float64)  # (1, 5)
    a = before[".params['out']['w']"][0][:, 0].astype(np.float64)  # (5,)
    setup = config_lib.build(cfg)
    x, y = setup.dataset.x_train.astype(np.float64), setup.dataset.y_train[:, 0].astype(np.float64)
    eta = np.asarray(dropout.sample_masks(setup.model.sites, key=rng.step_key(0, rng.DROPOUT, 0))[0], np.float64)
    # Hand-written backprop of R^drop = mean_i ½(sum_k a_k eta_k tanh(w_k x_i) - y_i)².
    h = np.tanh(x @ w)  # (n, 5)
    r = (h * eta) @ a - y
    grad_a = np.mean(r[:, None] * eta * h, axis=0)
    grad_w = np.mean((r[:, None] * a * eta * (1 - h**2))[:, None, :] * x[:, :, None], axis=0)
    # float32 training against a float64 reference: ~1e-6 relative rounding per operation.
    np.testing.assert_allclose(after[".params['out']['w']"][0][:, 0], a - 0.3 * grad_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after[".params['hidden'][0]['w']"][0], w - 0.3 * grad_w, rtol=1e-5, atol=1e-6)
    assert after[".step"] == 1


def test_jitted_advance_traces_once_for_any_chunk_length():
    cfg = smoke.get_config()
    setup = config_lib.build(cfg)
    objective = losses.make_objective("dropout", setup.model, cfg.loss, mode="per_sample", lr=0.1)
    step = make_replica_step(setup.model, objective, setup.optimizer, batch_size=50, mask_mode="per_sample")
    advance = jax.jit(make_advance(make_train_step(step)))
    state = loop.init_state(setup.model, setup.optimizer, seed=0, num_replicas=2, share_init=False, dtype=jnp.float32)
    x, y = jnp.asarray(setup.dataset.x_train), jnp.asarray(setup.dataset.y_train)
    for n in (1, 3, 7):
        state, _ = advance(state, jnp.asarray(n, jnp.int32), x, y, train_keys(0, 2))
    assert int(state.step) == 11
    assert advance._cache_size() == 1


def test_chunking_does_not_change_the_numbers():
    cfg = smoke.get_config()
    setup = config_lib.build(cfg)
    objective = losses.make_objective("dropout", setup.model, cfg.loss, mode="per_sample", lr=0.1)
    step = make_replica_step(setup.model, objective, setup.optimizer, batch_size=50, mask_mode="per_sample")
    advance = jax.jit(make_advance(make_train_step(step)))
    x, y = jnp.asarray(setup.dataset.x_train), jnp.asarray(setup.dataset.y_train)
    init = loop.init_state(setup.model, setup.optimizer, seed=0, num_replicas=1, share_init=False, dtype=jnp.float32)
    keys = train_keys(0, 1)
    one, _ = advance(init, jnp.asarray(12, jnp.int32), x, y, keys)
    many = init
    for n in (5, 1, 6):
        many, _ = advance(many, jnp.asarray(n, jnp.int32), x, y, keys)
    for u, v in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
        np.testing.assert_array_equal(u, v)


def test_carried_epoch_permutations_equal_per_step_sampling():
    """The loop's once-per-epoch permutation gives the same minibatches as drawing one every step,
    across epoch boundaries that fall inside and at the edges of chunks (exact equality)."""
    cfg = smoke.get_config()
    setup = config_lib.build(cfg)
    objective = losses.make_objective("dropout", setup.model, cfg.loss, mode="per_sample", lr=0.1)
    step = make_replica_step(setup.model, objective, setup.optimizer, batch_size=50, mask_mode="per_sample")
    per_step = jax.jit(make_advance(make_train_step(step)))
    carried = jax.jit(make_advance(make_train_step(step), Sampler(batch_size=50)))
    keys = train_keys(3, 3)
    x, y = jnp.asarray(setup.dataset.x_train), jnp.asarray(setup.dataset.y_train)
    steps_per_epoch = x.shape[0] // 50
    assert steps_per_epoch >= 2
    init = loop.init_state(setup.model, setup.optimizer, seed=0, num_replicas=3, share_init=False, dtype=jnp.float32)
    ref, _ = per_step(init, jnp.asarray(3 * steps_per_epoch + 1, jnp.int32), x, y, keys)
    got = init
    for n in (1, steps_per_epoch - 1, steps_per_epoch + 1, steps_per_epoch):  # chunk edges on and off epochs
        got, _ = carried(got, jnp.asarray(n, jnp.int32), x, y, keys)
    assert int(got.step) == int(ref.step)
    for u, v in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.heavy
def test_same_seed_same_run_and_resume_is_bit_identical(tmp_path):
    cfg = smoke.get_config()
    a, b, c = (str(tmp_path / n) for n in "abc")
    loop.run(cfg, a)
    loop.run(cfg, b)
    assert _metrics(a) == _metrics(b)
    # Interrupt c: keep only the checkpoint of step 20, then resume.
    loop.run(cfg, c)
    for step, path in io.list_checkpoints(c):
        if step > 20:
            os.remove(path)
    record = loop.run(cfg, c)
    assert record["step"] == 60
    step_a, final_a = _final(a)
    step_c, final_c = _final(c)
    assert step_a == step_c == 60
    for name in final_a:
        np.testing.assert_array_equal(final_a[name], final_c[name])
    assert _metrics(a) == _metrics(c)
    other = smoke.get_config()
    other.seed = 1
    loop.run(other, str(tmp_path / "d"))
    assert _metrics(str(tmp_path / "d")) != _metrics(a)


@pytest.mark.heavy
def test_corrupt_checkpoint_is_reported_and_skipped(tmp_path):
    cfg = smoke.get_config()
    workdir = str(tmp_path)
    loop.run(cfg, workdir)
    _, reference = _final(workdir)
    step, path = io.list_checkpoints(workdir)[-1]
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(io.CorruptCheckpoint):
        io.read_checkpoint(path)
    messages = []
    like = jax.device_get(loop.init_state(config_lib.build(cfg).model, config_lib.build(cfg).optimizer,
                                          seed=0, num_replicas=1, share_init=False, dtype=jnp.float32))
    found_step, _ = io.latest_valid_checkpoint(workdir, like, log=messages.append)
    assert found_step < step and "corrupt" in messages[0]
    loop.run(cfg, workdir)  # resumes from the last good checkpoint and redoes the rest
    _, redone = _final(workdir)
    for name in reference:
        np.testing.assert_array_equal(reference[name], redone[name])


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path):
    cfg = smoke.get_config()
    cfg.loss, cfg.optim.lr = "mse", 1e4
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite training loss at step \d+") as info:
        loop.run(cfg, str(tmp_path))
    bad_step = int(str(info.value).split("at step ")[1].split(";")[0])
    for step, path in io.list_checkpoints(str(tmp_path)):
        assert step <= bad_step
        arrays = io.read_checkpoint(path)
        assert all(np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f")


@pytest.mark.heavy
def test_replicas_are_independent_seeds_and_replica_zero_is_the_single_run(tmp_path):
    single, multi = smoke.get_config(), smoke.get_config()
    multi.train.num_replicas = 3
    loop.run(single, str(tmp_path / "one"))
    loop.run(multi, str(tmp_path / "three"))
    _, one = _final(str(tmp_path / "one"))
    _, three = _final(str(tmp_path / "three"))
    w1, w3 = one[".params['out']['w']"], three[".params['out']['w']"]
    assert w3.shape[0] == 3
    # vmapped vs unbatched float32 kernels may round differently; 60 steps keep it ~1e-6.
    np.testing.assert_allclose(w3[0], w1[0], rtol=1e-4, atol=1e-5)
    assert np.abs(w3[1] - w3[0]).max() > 1e-2
    shared = smoke.get_config()
    shared.train.num_replicas, shared.train.share_init = 2, True
    loop.run(shared, str(tmp_path / "shared"))
    start = io.read_checkpoint(io.checkpoint_path(str(tmp_path / "shared"), 0))[".params['out']['w']"]
    np.testing.assert_array_equal(start[0], start[1])


@pytest.mark.heavy
def test_train_py_end_to_end_loss_decreases(tmp_path, root):
    workdir = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--config={root}/configs/smoke.py",
                           f"--workdir={workdir}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"outputs in {workdir}" in proc.stdout
    records = io.read_jsonl(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 20, 40, 60]
    assert records[-1]["train/risk"] < 0.7 * records[0]["train/risk"]  # chance level is log 10 = 2.3
    assert records[-1]["test/acc"] > 0.5
    assert all(r["steps_per_sec"] > 0 for r in records[1:])
    saved = io.read_json(str(workdir / "config.json"))
    assert saved["config"]["model"]["keep_prob"] == 0.8 and "jax" in saved["versions"]
    assert [s for s, _ in io.list_checkpoints(str(workdir))] == [0, 20, 40, 60]


def _train_cmd(root, workdir, *extra):
    return [sys.executable, os.path.join(root, "train.py"), f"--config={root}/configs/smoke.py",
            f"--workdir={workdir}", "--config.train.num_steps=3000", "--config.train.checkpoint_every=50",
            "--config.train.eval_every=500", "--config.train.checkpoint_steps=", "--config.train.log_every_secs=0.2",
            *extra]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, root):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(_train_cmd(root, killed), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [s for s, _ in io.list_checkpoints(str(killed))]
        if any(300 <= s < 3000 for s in steps):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = [s for s, _ in io.list_checkpoints(str(killed))]
    assert steps and max(steps) < 3000, f"run was not interrupted mid-way: {steps}"
    for cmd in (_train_cmd(root, killed), _train_cmd(root, clean)):
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    _, a = _final(str(killed))
    _, b = _final(str(clean))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.slow
def test_replicas_sharded_over_devices_match_one_device(tmp_path, root):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for name, run_env in (("many", env), ("one", dict(os.environ))):
        done = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--config={root}/configs/smoke.py",
                               f"--workdir={tmp_path / name}", "--config.train.num_replicas=4"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600, env=run_env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert io.read_json(str(tmp_path / "many" / "config.json"))["versions"]["devices"] == 4
    _, a = _final(str(tmp_path / "many"))
    _, b = _final(str(tmp_path / "one"))
    for name in a:  # same programme, partitioned: equal up to float32 re-association
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.heavy
def test_trajectory_snapshots_survive_resume(tmp_path):
    cfg = smoke.get_config()
    cfg.train.snapshot_start, cfg.train.snapshot_every = 30, 3
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    loop.run(cfg, a)
    snaps = io.load_arrays(os.path.join(a, "snapshots.npz"))
    assert snaps["steps"].tolist() == list(range(30, 61, 3))
    _, final = _final(a)
    flat_final = np.concatenate([final[k][0].ravel() for k in sorted(final) if k.startswith(".params")])
    assert snaps["params"].shape == (1, 11, flat_final.size)
    loop.run(cfg, b)
    for step, path in io.list_checkpoints(b):
        if step > 40:
            os.remove(path)
    loop.run(cfg, b)  # resumes at 40 with the snapshots up to 40, retakes the rest
    again = io.load_arrays(os.path.join(b, "snapshots.npz"))
    np.testing.assert_array_equal(again["steps"], snaps["steps"])
    np.testing.assert_array_equal(again["params"], snaps["params"])
