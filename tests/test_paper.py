"""The paper-scale plan: selection, configs, statistics and verdicts (fast); the tiny pipeline (slow)."""

import gzip
import importlib
import math
import os
import pickle

import numpy as np
import pytest

from sme import data, paper, paper_report


def test_only_selects_in_run_order_and_names_bad_experiments():
    assert paper.select("p-e4,P-E5") == ["P-E5", "P-E4"]  # case-insensitive, run order kept
    assert paper.select(None) == list(paper.EXPERIMENTS)
    with pytest.raises(paper.PaperError, match=r"unknown experiment\(s\) \['P-E9'\]"):
        paper.select("P-E5,P-E9")


@pytest.mark.parametrize("name", ["P-E5", "P-E4", "P-E6", "P-E3"])
def test_every_planned_config_validates_and_has_a_tiny_variant(name):
    from sme import config as config_lib

    module = paper.experiment_module(name)
    assert module.__doc__ and module.KERNEL and module.BUDGET > 0
    for tiny in (False, True):
        plan = module.get_plan(tiny)
        assert len({e["name"] for e in plan}) == len(plan)  # one workdir per run
        for entry in plan:
            config_lib.validate(entry["config"])
            if tiny:
                assert entry["config"].train.num_steps <= 60 and max(entry["config"].model.hidden) <= 16


def test_p_e4_dropout_has_the_papers_per_layer_keep_probs():
    from sme import config as config_lib
    from configs.paper import p_e4

    ds = data.Dataset(np.zeros((4, 784), np.float32), np.eye(10, dtype=np.float32)[:4],
                      np.zeros((2, 784), np.float32), np.eye(10, dtype=np.float32)[:2], 10, "mnist")
    model = config_lib.build_model(p_e4.get_config("dropout"), ds)
    assert [s.keep_prob for s in model.sites] == [0.8, 0.5]
    assert [s.keep_prob for s in config_lib.build_model(p_e4.get_config("plain"), ds).sites] == [1.0, 1.0]


def test_t_interval_matches_the_textbook_formula():
    values = [88.0, 89.5, 87.0]
    ci = paper_report.t_interval(values)
    # t_{0.975, 2} = 4.302652729911275 (tables); sd = 1.258305739211792
    half = 4.302652729911275 * np.std(values, ddof=1) / math.sqrt(3)
    assert ci["mean"] == pytest.approx(88.1666666, abs=1e-6)
    assert ci["high"] - ci["mean"] == pytest.approx(half, rel=1e-9)
    assert paper_report.t_interval([1.0])["low"] is None  # one seed: no interval


def test_welch_interval_against_scipy_welch_test():
    from scipy import stats

    a, b = [98.6, 98.8, 98.7, 98.9], [98.0, 98.3, 98.1]
    ci = paper_report.welch_interval(a, b)
    res = stats.ttest_ind(a, b, equal_var=False)
    lo, hi = res.confidence_interval(0.95)
    assert (ci["low"], ci["high"]) == pytest.approx((lo, hi), rel=1e-9)


def test_verdicts_follow_the_stated_rules():
    ci = lambda m, lo, hi: {"mean": m, "low": lo, "high": hi, "n": 3}  # noqa: E731
    assert paper_report.verdict_absolute(ci(88, 87, 89), (88, 89))[0] == "reproduced"
    assert paper_report.verdict_absolute(ci(85, 84, 86), (88, 89))[0] == "partly"  # 2 pp below
    assert paper_report.verdict_absolute(ci(90, 89.6, 90.4), (79, 79))[0] == "not reproduced"
    assert paper_report.verdict_sign(ci(9, 7, 11), +1, 9)[0] == "reproduced"
    assert paper_report.verdict_sign(ci(1, 0.5, 1.5), +1, 9)[0] == "partly"  # right sign, far too small
    assert paper_report.verdict_sign(ci(1, -1, 3), +1)[0] == "partly"
    assert paper_report.verdict_sign(ci(-1, -3, 1), +1)[0] == "not reproduced"
    assert paper_report.verdict_sign(ci(-0.2, -0.3, -0.1), -1)[0] == "reproduced"  # smaller, as claimed
    assert paper_report.verdict_equal(ci(0.2, -0.5, 0.9), 1.0)[0] == "reproduced"
    assert paper_report.verdict_equal(ci(0.2, -2, 2.4), 1.0)[0] == "partly"
    assert paper_report.verdict_absolute({"mean": None}, (1, 2))[0] == "not run"
    psi = ci(3.2, 2.9, 3.4)  # the exponent psi against Feng & Tu's 4: 0.6 below, within 1.5
    assert paper_report.verdict_absolute(psi, (4, 4), (0.5, 1.5), unit="") == ("partly", "0.6 below the paper's number")


def test_report_of_an_empty_folder_says_not_run(tmp_path):
    report = paper_report.write_report(str(tmp_path))
    sections = report["experiments"]
    assert set(sections) == set(paper.EXPERIMENTS)
    assert sections["P-E5"]["status"] == "not run in this budget"
    text = (tmp_path / "report.md").read_text()
    assert "| claim | paper | ours [95% CI] | verdict | reason |" in text


def _fake_mnist(path, n_train=300, n_test=200):
    gen = np.random.default_rng(0)
    split = lambda k: (gen.random((k, 784), dtype=np.float32), np.arange(k, dtype=np.int64) % 10)  # noqa: E731
    with gzip.open(path, "wb") as f:
        pickle.dump((split(n_train - 50), split(50), split(n_test)), f, protocol=2)


@pytest.mark.slow
def test_tiny_pipeline_trains_analyses_resumes_and_reports(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "mnist.pkl.gz"
    _fake_mnist(fake)
    monkeypatch.setattr(data, "mnist_pickle_path", lambda: str(fake))
    out = str(tmp_path / "report")
    lines = []
    report = paper.run_paper(out, "P-E5,P-E4", tiny=True, log=lines.append)
    assert lines[0].startswith("experiment 1 of 2: P-E5") and "ETA" in lines[0]
    sections = report["experiments"]
    assert sections["P-E5"]["status"] == "complete" and sections["P-E4"]["status"] == "complete"
    assert sections["P-E3"]["status"] == "not run in this budget"
    rows = {r["claim"]: r for r in sections["P-E4"]["rows"]}
    assert "(n=3)" in rows["test accuracy with dropout"]["ours"]
    timings = report["experiments"]["P-E4"]["timing"]
    assert timings["train_seconds"] > 0 and timings["analysis_seconds"] > 0 and timings["kernel"]
    for fig in sections["P-E5"]["figures"] + sections["P-E4"]["figures"]:
        from PIL import Image

        with Image.open(os.path.join(out, fig)) as im:
            assert im.info["dpi"][0] >= 120
    first = paper.io.read_json(os.path.join(out, "timings.json"))
    lines.clear()
    paper.run_paper(out, "P-E5", tiny=True, log=lines.append)  # resumed: nothing retrained
    assert sum("(trained already)" in line for line in lines) == 9
    assert paper.io.read_json(os.path.join(out, "timings.json"))["P-E5"]["runs"] == first["P-E5"]["runs"]


def test_p_e3_block_is_the_weights_between_the_hidden_layers():
    import jax
    from jax.flatten_util import ravel_pytree

    from configs.paper import p_e3
    from sme import config as config_lib, paper_e3

    ds = data.Dataset(np.zeros((4, 784), np.float32), np.eye(10, dtype=np.float32)[:4],
                      np.zeros((2, 784), np.float32), np.eye(10, dtype=np.float32)[:2], 10, "mnist")
    model = config_lib.build_model(p_e3.get_config("sgd"), ds)
    params = model.init(jax.random.PRNGKey(0))
    mask = paper_e3.block_mask(params, p_e3.BLOCK)
    flat = np.asarray(ravel_pytree(params)[0])
    assert mask.shape == (784 * 50 + 50 * 50 + 50 * 10,) and mask.sum() == 2500  # no biases
    np.testing.assert_array_equal(flat[mask], np.asarray(params["hidden"][1]["w"]).reshape(-1))
