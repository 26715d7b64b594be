"""sme: stochastic modified equations and the dynamics of dropout, in JAX.

The package is a flat set of pure-function modules (see README.md, "Python API" and "Layout").
The core functions are reachable from here, e.g. ``sme.make_model``, ``sme.Problem``,
``sme.risk``, ``sme.problem_hvp``, ``sme.top_eigenpairs``, ``sme.mask_covariance``,
``sme.alignment_factored``, ``sme.make_sme``; every module too (``sme.hessian``, ``sme.lanczos``).

Names are imported on first use (PEP 562), so ``import sme`` and ``import sme.<module>`` stay
cheap and have no side effects: importing `sme` does not touch devices or RNG state, and the
package itself imports nothing at import time (no import cycle through it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS = {
    # models and masks
    "Model": ("models", "Model"), "MLPSpec": ("models", "MLPSpec"), "CNNSpec": ("models", "CNNSpec"),
    "make_model": ("models", "make_model"), "make_mlp": ("models", "make_mlp"), "make_cnn": ("models", "make_cnn"),
    "batch_apply": ("models", "batch_apply"), "num_params": ("models", "num_params"),
    "Site": ("dropout", "Site"), "MASK_MODES": ("dropout", "MASK_MODES"), "sample_masks": ("dropout", "sample_masks"),
    "ones_masks": ("dropout", "ones_masks"), "enumerate_masks": ("dropout", "enumerate_masks"),
    "mask_shape": ("dropout", "mask_shape"),
    # the problem bundle and shared rules
    "Problem": ("problem", "Problem"), "draw_masks": ("problem", "draw_masks"),
    "resolve_method": ("problem", "resolve_method"), "has_closed_form": ("problem", "has_closed_form"),
    "check_closed_form": ("problem", "check_closed_form"), "tree_sq_norm": ("problem", "tree_sq_norm"),
    # losses
    "risk": ("losses", "risk"), "dropout_risk": ("losses", "dropout_risk"), "r1": ("losses", "r1"),
    "modified_loss": ("losses", "modified_loss"), "modified_loss_mc": ("losses", "modified_loss_mc"),
    "modified_loss_exact": ("losses", "modified_loss_exact"), "r2_penalty": ("losses", "r2_penalty"),
    "make_objective": ("losses", "make_objective"), "mse": ("losses", "mse"),
    "cross_entropy": ("losses", "cross_entropy"),
    # gradients
    "mask_gradients": ("grads", "mask_gradients"), "sampled_mask_gradients": ("grads", "sampled_mask_gradients"),
    "per_sample_gradients": ("grads", "per_sample_gradients"), "ravel": ("grads", "ravel"),
    # curvature: HVPs, Lanczos, SLQ, traces
    "hvp": ("hessian", "hvp"), "make_flat_hvp": ("hessian", "make_flat_hvp"),
    "make_hessian_loss": ("hessian", "make_hessian_loss"), "make_hvp": ("hessian", "make_hvp"),
    "problem_hvp": ("hessian", "problem_hvp"), "resolve_loss_kind": ("hessian", "resolve_loss_kind"),
    "make_fisher": ("hessian", "make_fisher"), "to_dense": ("hessian", "to_dense"),
    "top_eigenpairs": ("lanczos", "top_eigenpairs"), "slq_density": ("lanczos", "slq_density"),
    "smooth_density": ("lanczos", "smooth_density"), "hutchinson_trace": ("lanczos", "hutchinson_trace"),
    "hutchpp_trace": ("lanczos", "hutchpp_trace"),
    # the dropout noise and its relation to the Hessian
    "Factored": ("covariance", "Factored"), "mask_covariance": ("covariance", "mask_covariance"),
    "exact_mask_covariance": ("covariance", "exact_mask_covariance"),
    "per_sample_covariance": ("covariance", "per_sample_covariance"),
    "alignment": ("relations", "alignment"), "alignment_factored": ("relations", "alignment_factored"),
    "trace_h_sigma": ("relations", "trace_h_sigma"), "hessian_norms": ("relations", "hessian_norms"),
    "haar_null": ("relations", "haar_null"), "wishart_null": ("relations", "wishart_null"),
    "projected_variance": ("relations", "projected_variance"),
    # the SME and its lockstep simulation
    "make_sme": ("sde", "make_sme"), "make_ode": ("sde", "make_ode"), "em_integrate": ("sde", "em_integrate"),
    "dropout_gd_step": ("sde", "dropout_gd_step"), "diffusion_sample": ("diffusion", "diffusion_sample"),
    "LockstepSpec": ("lockstep", "LockstepSpec"), "init_lockstep": ("lockstep", "init_lockstep"),
    "make_advance": ("lockstep", "make_advance"),
    # landscape
    "pca": ("landscape", "pca"), "problem_loss": ("landscape", "problem_loss"),
    "interval_flatness": ("landscape", "interval_flatness"), "flatness_along": ("landscape", "flatness_along"),
    "random_direction": ("landscape", "random_direction"), "filter_normalize": ("landscape", "filter_normalize"),
    "profile_1d": ("landscape", "profile_1d"), "profile_2d": ("landscape", "profile_2d"),
    "interpolate": ("landscape", "interpolate"),
}
_MODULES = ("covariance", "diffusion", "dropout", "grads", "hessian", "landscape", "lanczos", "lockstep", "losses",
            "models", "problem", "relations", "sde", "stats")

__all__ = ["__version__", *_EXPORTS, *_MODULES]

if TYPE_CHECKING:  # for type checkers and readers; at run time names come from __getattr__
    from sme import (covariance, diffusion, dropout, grads, hessian, landscape, lanczos, lockstep, losses, models,
                     problem, relations, sde, stats)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(f"sme.{module}"), attribute)
    elif name in _MODULES:
        value = importlib.import_module(f"sme.{name}")
    else:
        raise AttributeError(f"module 'sme' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
