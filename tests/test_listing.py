"""analyze.py --list: every analysis with its settings, defaults and their comments."""

from sme import listing
from sme.analyses import load_all
from sme.analyses import curvature, noise


def test_every_analysis_lists_its_own_defaults():
    registry = load_all()
    assert set(listing.SETTINGS) == set(registry)  # a new analysis must say where its defaults are
    for name in registry:
        listed = listing.settings(name)
        module, attr = listing.SETTINGS[name]
        assert dict((k, v) for k, v, _ in listed) == getattr(__import__(f"sme.analyses.{module}",
                                                                        fromlist=[attr]), attr)


def test_comments_come_from_the_analysis_own_dict_or_its_base():
    comments = {k: c for k, _, c in listing.settings("alignment")}
    assert comments["top_k"] == "Hessian eigenpairs for the projected variance"  # not covariance's top_k
    hessian = {k: (v, c) for k, v, c in listing.settings("hessian")}
    assert hessian["top_k"] == (curvature.HESSIAN_DEFAULTS["top_k"], "largest eigenpairs")
    assert hessian["chunk_size"][1].startswith("examples per HVP chunk")  # inherited from _LOSS_DEFAULTS
    text = listing.describe(load_all())
    assert f"covariance.num_masks={noise.COVARIANCE_DEFAULTS['num_masks']!r}" in text
    assert "--set hessian.top_k=20" in text
