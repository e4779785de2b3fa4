"""Gaussian mixtures whose noised densities, and hence TRUE scores, are known in closed form at every time.

Under the OU forward process a Gaussian component ``N(mu_k, Sigma_k)`` becomes, at time ``t``,
``N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I)``; the mixture weights do not change. So ``p_t`` and
``grad log p_t`` are exact, with no learned model in between: the reference against which the empirical score
(and any trained network) is measured.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_points
from .time import ou_alpha_sigma


class GaussianMixture:
    """``P = sum_k w_k N(mu_k, Sigma_k)`` in ``R^d`` and its OU-noised versions ``P_t``.

    Args:
        means: ``(K, d)`` component means ``mu_k``.
        covs: ``None`` (identity, the paper's experiments), one shared ``(d, d)`` covariance, or ``(K, d, d)``
            per-component covariances; each must be symmetric positive definite.
        weights: ``(K,)`` non-negative weights, normalised to sum to one; ``None`` means uniform ``1/K``
            (the paper's Assumption 4.2).

    All computations run in the dtype and on the device of the query points (parameters are cast to them), so a
    float64 query gets float64 accuracy.
    """

    def __init__(self, means: torch.Tensor, covs: torch.Tensor | None = None, weights: torch.Tensor | None = None):
        means = check_points(means, "means")
        num_components, dim = means.shape
        if covs is None:
            covs = torch.eye(dim, dtype=means.dtype, device=means.device)
        if not isinstance(covs, torch.Tensor):
            raise TypeError(f"covs must be a torch.Tensor or None (got {type(covs).__name__}).")
        covs = covs.to(dtype=means.dtype, device=means.device)
        if covs.shape == (dim, dim):
            covs = covs.expand(num_components, dim, dim)
        if covs.shape != (num_components, dim, dim):
            raise ValueError(
                f"covs must have shape ({dim}, {dim}) or ({num_components}, {dim}, {dim}) to match means of shape "
                f"{tuple(means.shape)} (got {tuple(covs.shape)}); pass one covariance per component or a shared one."
            )
        if not torch.isfinite(covs).all():
            raise ValueError("covs contains NaN or inf; pass finite covariance matrices.")
        if not torch.allclose(covs, covs.transpose(-1, -2), rtol=1e-5, atol=1e-8):
            raise ValueError("covs must be symmetric; symmetrise them with 0.5 * (C + C.transpose(-1, -2)).")
        cholesky, info = torch.linalg.cholesky_ex(covs)
        if (info != 0).any():
            bad = torch.nonzero(info).flatten().tolist()
            raise ValueError(
                f"covs of component(s) {bad} are not positive definite; add a small ridge, e.g. C + 1e-6 * I."
            )
        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components, dtype=means.dtype, device=means.device)
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        if weights.shape != (num_components,):
            raise ValueError(f"weights must have shape ({num_components},) (got {tuple(weights.shape)}); "
                             "pass one weight per component.")
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero (they are normalised to sum 1).")
        self.means = means
        self.covs = covs.contiguous()
        self.weights = weights / weights.sum()
        self._cov_cholesky = cholesky

    @classmethod
    def random(
        cls,
        num_components: int,
        dim: int,
        mean_scale: float = 2.0,
        cov_scale: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "GaussianMixture":
        """The paper's synthetic mixture: ``mu_k ~ N(0, mean_scale^2 I)`` i.i.d., covariance ``cov_scale * I``,
        uniform weights. ``mean_scale=2`` is section 5's ``N(0, 4 I_d)``; with it ``||mu_k - mu_l|| ~ 2 sqrt(2d)``,
        the ``Delta_min = Theta(sqrt d)`` separation of Theorem 4.3."""
        if int(num_components) < 1 or int(dim) < 1:
            raise ValueError(f"num_components and dim must be positive (got {num_components}, {dim}).")
        if not cov_scale > 0:
            raise ValueError(f"cov_scale must be > 0 (got {cov_scale}); the covariance is cov_scale * I.")
        gen_device = generator.device if generator is not None else device
        means = mean_scale * torch.randn(int(num_components), int(dim), generator=generator,
                                         dtype=dtype or torch.get_default_dtype(), device=gen_device)
        means = means.to(device) if device is not None else means
        covs = cov_scale * torch.eye(int(dim), dtype=means.dtype, device=means.device)
        return cls(means, covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def trace_cov(self) -> float:
        """``tr(Sigma)`` of Theorem 4.3: the weighted mean of the components' traces (they coincide in the paper)."""
        return float((self.weights * torch.diagonal(self.covs, dim1=-2, dim2=-1).sum(-1)).sum())

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        """A copy on another device / in another dtype."""
        return GaussianMixture(self.means.to(device=device, dtype=dtype), self.covs.to(device=device, dtype=dtype),
                               self.weights.to(device=device, dtype=dtype))

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        """``n`` i.i.d. points of ``P = P_0``: ``(n, d)``, and with ``return_components`` also their component ids."""
        if int(n) < 0:
            raise ValueError(f"n must be >= 0 (got {n}).")
        components = torch.multinomial(self.weights, int(n), replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long, device=self.means.device)
        noise = torch.randn(int(n), self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        x = self.means[components] + torch.einsum("nij,nj->ni", self._cov_cholesky[components], noise)
        return (x, components) if return_components else x

    def _noised_terms(self, x: torch.Tensor, t: float):
        """Per-component log-densities ``log w_k + log N(x; alpha_t mu_k, C_k)`` ``(K, B)`` and
        ``C_k^{-1}(x - alpha_t mu_k)`` ``(K, B, d)``, with ``C_k = alpha_t^2 Sigma_k + sigma_t^2 I``."""
        x = check_points(x, "x", self.dim)
        if isinstance(t, torch.Tensor):
            t = t.item()
        alpha, sigma = ou_alpha_sigma(float(t))  # rejects t < 0; t = 0 is fine here since every Sigma_k > 0
        means, covs, weights = (p.to(dtype=x.dtype, device=x.device) for p in (self.means, self.covs, self.weights))
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        chol = torch.linalg.cholesky(alpha**2 * covs + sigma**2 * eye)  # C_k = L_k L_k^T, (K, d, d)
        # L_k^{-1} once per call (K small d x d solves), then batched matmuls over the B queries: far faster than
        # triangular solves with B right-hand sides, and C_k >= min(sigma_t^2 + alpha_t^2 lambda_min) is well
        # conditioned.
        chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        diff = x[None, :, :] - alpha * means[:, None, :]  # (K, B, d)
        whitened = diff @ chol_inv.transpose(-1, -2)  # L^-1 diff, (K, B, d)
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        log_normal = -0.5 * (whitened.pow(2).sum(-1) + log_det[:, None] + self.dim * math.log(2 * math.pi))
        precision_diff = whitened @ chol_inv  # C^-1 diff = L^-T L^-1 diff, (K, B, d)
        return torch.log(weights)[:, None] + log_normal, precision_diff

    def log_prob(self, x: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        """``log p_t(x)`` of the noised mixture, ``(B,)``; ``t = 0`` is the data density itself."""
        log_joint, _ = self._noised_terms(x, t)
        return torch.logsumexp(log_joint, dim=0)

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The true score ``grad_x log p_t(x) = -sum_k r_k(x) C_k^{-1} (x - alpha_t mu_k)``, ``(B, d)``, where
        ``r_k`` are the posterior component responsibilities (a softmax, so it is stable far from every mean).
        Any ``t >= 0`` works: at ``t = 0`` it is the data score, finite because every ``Sigma_k`` is positive
        definite."""
        log_joint, precision_diff = self._noised_terms(x, t)
        responsibilities = torch.softmax(log_joint, dim=0)  # (K, B)
        return -(responsibilities[:, :, None] * precision_diff).sum(0)

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim}, dtype={self.means.dtype})"
