"""Exact first and second moments of readout-only dropout regression and of its SMEs.

Frozen features phi_i (n, d) and a trained readout a (d,): R^drop(a; eta) = (1/2n) sum_i
(phi_i . (eta * a) - y_i)^2 with ONE mask eta shared by the batch (docs/theory.md, "The exact
linear case"). With D = diag(eta), A = Phi^T Phi / n, b = Phi^T y / n and v = (1 - p)/p, a step of
dropout GD is affine in a with coefficients independent of a,

    a' = M_eta a + c_eta,   M_eta = I - eps D A D,   c_eta = eps D b,

so m = E a and S = E a a^T obey closed recursions whose expectations over eta are exact sums over
the 2^d masks. The SME's drift is affine, -K a + k (order 1: K = A_hat = A + v diag(A), k = b;
order 2: both multiplied by I + (eps/2) A_hat), and its diffusion Sigma(a) = Cov_eta(g_eta(a)) is
quadratic in a, so E Sigma(Theta) is affine in (m, S) and (m, S) solve a linear ODE, integrated by
one matrix exponential (`sme_moments`). The same holds for the Euler-Maruyama chain of the SME
(`em_moments`): the oracle for the Monte Carlo lockstep of `sme.lockstep`. The ODE control is the
same with Sigma = 0.

Everything here is NumPy float64 built from (Phi, y, p) alone, with masks written out as
{0, 1/p}^d: it shares no code with `sme.dropout`, `sme.losses` or `sme.diffusion`, which it checks.
The state z = [m, vec S, 1] has d + d^2 + 1 entries; every map below is a (z -> z) matrix.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import scipy.linalg

KINDS = ("order1", "order2", "ode1", "ode2")
DRIFT_OF = {"order1": "order1", "order2": "order2", "ode1": "order1", "ode2": "order2"}


@dataclasses.dataclass(frozen=True)
class Linear:
    """Readout-only dropout regression: features ``phi`` (n, d), targets ``y`` (n,), ``keep_prob`` p."""

    phi: np.ndarray
    y: np.ndarray
    keep_prob: float

    def __post_init__(self):
        phi, y = np.asarray(self.phi, np.float64), np.asarray(self.y, np.float64).reshape(-1)
        if phi.ndim != 2 or phi.shape[0] != y.shape[0]:
            raise ValueError(f"phi must be (n, d) and y (n,); got {phi.shape} and {y.shape}")
        if not 0.0 < self.keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {self.keep_prob}")
        if phi.shape[1] > 16:
            raise ValueError(f"{phi.shape[1]} features: enumerating 2**d masks is limited to d <= 16")
        object.__setattr__(self, "phi", phi)
        object.__setattr__(self, "y", y)

    @property
    def dim(self) -> int:
        return self.phi.shape[1]

    @property
    def gram(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(A, b, c0): R_S(a) = a^T A a / 2 - b^T a + c0."""
        n = self.phi.shape[0]
        return self.phi.T @ self.phi / n, self.phi.T @ self.y / n, float(self.y @ self.y) / (2 * n)

    @property
    def a_hat(self) -> np.ndarray:
        """E_eta D A D = A + v diag(A): the Hessian of L_S = R_S + R_1."""
        a = self.gram[0]
        return a + (1.0 - self.keep_prob) / self.keep_prob * np.diag(np.diag(a))


def masks(dim: int, keep_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """All shared masks eta in {0, 1/p}^d (E = 2^d, d) and their probabilities (E,)."""
    bits = np.array(list(itertools.product((0.0, 1.0), repeat=dim))).reshape(-1, dim)
    probs = np.prod(np.where(bits > 0, keep_prob, 1.0 - keep_prob), axis=1)
    return bits / keep_prob, probs


def mask_gradients(problem: Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """g_eta(a) = G_eta a - h_eta with G = D A D (E, d, d), h = D b (E, d), and P (E,)."""
    a, b, _ = problem.gram
    eta, probs = masks(problem.dim, problem.keep_prob)
    return eta[:, :, None] * a[None] * eta[:, None, :], eta * b[None], probs


def expected_sigma(problem: Linear, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E_Theta Sigma(Theta) for E Theta = m, E Theta Theta^T = s: sum_eta P (G s G^T - G m h^T - h m^T G^T
    + h h^T) minus the same for the mean gradient (A_hat, b). Affine in (m, s). Cost: 2^d d^3."""
    g, h, probs = mask_gradients(problem)
    second = lambda gm, hv: gm @ s @ gm.T - np.outer(gm @ m, hv) - np.outer(hv, gm @ m) + np.outer(hv, hv)
    total = sum(p * second(gm, hv) for gm, hv, p in zip(g, h, probs))
    return total - second(problem.a_hat, problem.gram[1])


def drift_coefficients(problem: Linear, kind: str, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """(K, k) of the affine drift -K a + k. order1: (A_hat, b); order2: the gradient of L_S +
    (eps/4)||grad L_S||^2, i.e. both times I + (eps/2) A_hat."""
    a_hat, b = problem.a_hat, problem.gram[1]
    if DRIFT_OF.get(kind) == "order1":
        return a_hat, b
    if DRIFT_OF.get(kind) == "order2":
        corr = np.eye(problem.dim) + 0.5 * lr * a_hat
        return corr @ a_hat, corr @ b
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _pack(m, s) -> np.ndarray:
    return np.concatenate([m, s.ravel(), [1.0]])


def unpack(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z (..., d + d^2 + 1) -> (m (..., d), S (..., d, d))."""
    d = int(round((np.sqrt(4 * z.shape[-1] - 3) - 1) / 2))
    return z[..., :d], z[..., d:d + d * d].reshape(*z.shape[:-1], d, d)


def _affine_matrix(fn, dim: int) -> np.ndarray:
    """The matrix of an affine map (m, S) -> (m', S') acting on z = [m, vec S, 1]: column j is
    F(e_j) - F(0), the last column F(0) (and the 1 carried over)."""
    size = dim + dim * dim + 1
    out = np.zeros((size, size))
    zero = np.zeros(size - 1)
    base = _pack(*fn(*unpack(np.append(zero, 1.0))))
    for j in range(size - 1):
        e = zero.copy()
        e[j] = 1.0
        out[:, j] = _pack(*fn(*unpack(np.append(e, 1.0)))) - base
    out[:, -1] = base
    out[-1, :] = 0.0
    out[-1, -1] = 1.0
    return out


def dropout_gd_transition(problem: Linear, lr: float) -> np.ndarray:
    """One step of dropout GD on z: m' = E M m + E c, S' = E[M S M^T + M m c^T + c m^T M^T + c c^T]."""
    g, h, probs = mask_gradients(problem)
    eye = np.eye(problem.dim)

    def step(m, s):
        m_new, s_new = np.zeros_like(m), np.zeros_like(s)
        for gm, hv, p in zip(g, h, probs):
            mm, c = eye - lr * gm, lr * hv
            m_new += p * (mm @ m + c)
            s_new += p * (mm @ s @ mm.T + np.outer(mm @ m, c) + np.outer(c, mm @ m) + np.outer(c, c))
        return m_new, s_new

    return _affine_matrix(step, problem.dim)


def sme_generator(problem: Linear, kind: str, lr: float, *, diffusion_scale: float = 1.0) -> np.ndarray:
    """dz/dt = G z for the SME (``orderk``: eps Sigma, times ``diffusion_scale``) or the ODE (``odek``)."""
    big_k, k = drift_coefficients(problem, kind, lr)
    noise = 0.0 if kind.startswith("ode") else lr * diffusion_scale

    def rate(m, s):
        ds = -big_k @ s - s @ big_k.T + np.outer(k, m) + np.outer(m, k)
        return -big_k @ m + k, ds + noise * expected_sigma(problem, m, s)

    gen = _affine_matrix(rate, problem.dim)
    gen[-1, -1] = 0.0  # d(1)/dt = 0
    return gen


def em_transition(problem: Linear, kind: str, lr: float, substeps: int, *, diffusion_scale: float = 1.0) -> np.ndarray:
    """One discrete step (l Euler-Maruyama substeps of h = eps/l) of the SME or the ODE on z:
    Theta' = Theta + h(-K Theta + k) + sqrt(eps h) sigma xi, so m' = B m + h k and S' = B S B^T +
    h (B m k^T + k m^T B^T) + h^2 k k^T + eps h E Sigma, with B = I - h K."""
    big_k, k = drift_coefficients(problem, kind, lr)
    h = lr / substeps
    noise = 0.0 if kind.startswith("ode") else lr * h * diffusion_scale
    bm = np.eye(problem.dim) - h * big_k

    def sub(m, s):
        s_new = bm @ s @ bm.T + h * (np.outer(bm @ m, k) + np.outer(k, bm @ m)) + h * h * np.outer(k, k)
        return bm @ m + h * k, s_new + noise * expected_sigma(problem, m, s)

    return np.linalg.matrix_power(_affine_matrix(sub, problem.dim), substeps)


def start(a0: np.ndarray) -> np.ndarray:
    """z of the point mass at a0."""
    a0 = np.asarray(a0, np.float64)
    return _pack(a0, np.outer(a0, a0))


def iterate(transition: np.ndarray, z0: np.ndarray, num_steps: int) -> np.ndarray:
    """z_0, ..., z_N under a one-step transition: (N + 1, size)."""
    out = [z0]
    for _ in range(num_steps):
        out.append(transition @ out[-1])
    return np.stack(out)


def sme_moments(problem: Linear, kind: str, a0, lr: float, times, *, diffusion_scale: float = 1.0) -> np.ndarray:
    """z(t) of the SME/ODE from the point mass at a0, at each of ``times`` (T,) -> (T, size). Exact:
    one matrix exponential per time. Cost: T (d^2)^3."""
    gen = sme_generator(problem, kind, lr, diffusion_scale=diffusion_scale)
    return np.stack([scipy.linalg.expm(gen * t) @ start(a0) for t in np.asarray(times, np.float64)])


def quadratic(problem: Linear, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(Q, q, c) of g(a) = a^T Q a / 2 - q^T a + c for R_S, L_S and sq_norm = ||a||^2."""
    a, b, c0 = problem.gram
    if name == "R_S":
        return a, b, c0
    if name == "L_S":
        return problem.a_hat, b, c0
    if name == "sq_norm":
        return 2.0 * np.eye(problem.dim), np.zeros(problem.dim), 0.0
    raise ValueError(f"unknown test function {name!r}; expected R_S, L_S or sq_norm")


def expectation(problem: Linear, name: str, z: np.ndarray) -> np.ndarray:
    """E g from moments z (..., size): tr(Q S)/2 - q^T m + c."""
    q_mat, q, c = quadratic(problem, name)
    m, s = unpack(z)
    return 0.5 * np.einsum("ij,...ji->...", q_mat, s) - m @ q + c


def covariance(z: np.ndarray) -> np.ndarray:
    """Cov Theta = S - m m^T from z (..., size) -> (..., d, d)."""
    m, s = unpack(z)
    return s - m[..., :, None] * m[..., None, :]


def weak_errors(problem: Linear, a0, lr: float, horizon: float, *, kinds=KINDS, functions=("R_S", "L_S", "sq_norm"),
                fractions=(0.5, 1.0)) -> dict:
    """Exact weak errors of the SME variants against dropout GD at the times t = f T (f in
    ``fractions``; N = f T / eps steps, rounded): |E g(theta_N) - E g(Theta_t)| per function, and
    ||Cov theta_N - Cov Theta_t||_F (``cov``). Returns {kind: {name: (F,) errors}}."""
    num = int(round(horizon / lr))
    steps = [int(round(f * num)) for f in fractions]
    disc = iterate(dropout_gd_transition(problem, lr), start(a0), num)[steps]
    out = {}
    for kind in kinds:
        cont = sme_moments(problem, kind, a0, lr, [n * lr for n in steps])
        row = {g: np.abs(expectation(problem, g, disc) - expectation(problem, g, cont)) for g in functions}
        row["cov"] = np.linalg.norm(covariance(disc) - covariance(cont), axis=(-2, -1))
        out[kind] = row
    return out


# --- The same problem as a `sme.models.Model`, for the lockstep -----------------------------------


@dataclasses.dataclass(frozen=True)
class ReadoutSpec:
    """Spec of `readout_model`: features in, one output, dropout on the features."""

    in_dim: int
    keep_prob: float
    out_dim: int = 1


def readout_model(dim: int, keep_prob: float):
    """f(phi; eta) = (eta * phi) . w with params {"out": {"w": (d, 1)}}: the frozen-feature net, whose
    input IS the feature vector phi_i (closed-form L_S and Sigma apply: dropout on the readout input)."""
    from sme.dropout import Site
    from sme.models import Model

    def init(key, dtype=None):
        import jax.numpy as jnp
        return {"out": {"w": jnp.zeros((dim, 1), dtype or jnp.float32)}}

    penultimate = lambda params, x, masks: x
    apply = lambda params, x, masks: (x * masks[0]) @ params["out"]["w"]
    return Model(ReadoutSpec(dim, keep_prob), (Site("features", (dim,), keep_prob),), init, apply, penultimate,
                 lambda params: params["out"]["w"])
