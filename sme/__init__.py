"""sme: stochastic modified equations and the dynamics of dropout, in JAX.

The package is a flat set of pure-function modules (see README.md). Nothing here
has import-time side effects; importing `sme` does not touch devices or RNG state.
"""

__version__ = "0.1.0"
