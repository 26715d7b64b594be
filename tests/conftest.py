"""Shared fixtures: float64 (``x64``), keys and tiny problems built by ``sme.testing``.

A module whose every test runs in float64 says so once::

    pytestmark = pytest.mark.usefixtures("x64")

and a single test asks for the ``x64`` fixture. The problem fixtures are float64 and have
module scope: a module's tests share one problem (same shapes, so jitted functions compile once).
"""

import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Compiled programs persist between runs in .pytest_cache (tens of MB; keyed by the JAX version, the
# program and its options, so an edit recompiles only what it changed): a second run of the default
# tier compiles little. This process only (subprocesses compile as users' runs do).
# SME_TEST_JAX_CACHE=0 switches it off, or names another directory.
_CACHE = os.environ.get("SME_TEST_JAX_CACHE", os.path.join(
    ROOT, ".pytest_cache", "jax-" + ("opt" if os.environ.get("SME_TEST_XLA_OPT") == "1" else "opt0")))
if _CACHE != "0":
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# The tests compile thousands of tiny XLA programs and run each a few times, so LLVM's optimisation
# passes cost more than they save: without them in-process tests take a quarter to a third less CPU.
# Floating-point semantics are unchanged (fast-math stays off, so no reassociation). This process
# only: the flag leaves the environment after the first compilation has read it, so the train.py and
# analyze.py subprocesses that tests start compile as users' runs do. SME_TEST_XLA_OPT=1 keeps LLVM's
# default optimisation here as well.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if os.environ.get("SME_TEST_XLA_OPT") != "1":
    _flags = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{_flags or ''} {_FAST_COMPILE}".strip()
    jax.jit(lambda v: v + 1)(1.0)  # XLA reads XLA_FLAGS once, at the first compilation
    if _flags is None:
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = _flags

from sme import testing  # noqa: E402


@pytest.fixture
def root():
    return ROOT


@pytest.fixture
def x64():
    """Float64 for the duration of one test (JAX's ``enable_x64`` context, restored afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    """The test's base PRNG key; derive others with ``jax.random.split``/``fold_in``."""
    return jax.random.key(0)


@pytest.fixture
def keys():
    """``keys(n)``: n independent keys split from ``jax.random.key(0)``."""
    return lambda n: jax.random.split(jax.random.key(0), n)


@pytest.fixture(scope="module")
def tiny_mlp():
    """(model, params, x, y): an MLP 3 -> (5, 4) -> 3, tanh, keep_prob 0.7, 7 examples, float64."""
    with jax.enable_x64(True):
        return testing.mlp_problem()


@pytest.fixture(scope="module")
def two_layer_net():
    """(model, params, x, y): the two-layer net 2 -> 3 -> 1, keep_prob 0.6, 5 examples, float64."""
    with jax.enable_x64(True):
        return testing.two_layer_problem()


@pytest.fixture(scope="module")
def problem(tiny_mlp):
    """``tiny_mlp`` as a ``Problem`` bundle (mse, shared masks) with its params: (problem, params)."""
    from sme.diffusion import Problem

    model, params, x, y = tiny_mlp
    return Problem(model, "mse", "shared", x, y), params
