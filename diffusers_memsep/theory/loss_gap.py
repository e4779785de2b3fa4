"""Loss-Gap_t, the Fisher divergence it equals (Proposition 4.1), and the shape of Theorem 4.3's lower bound.

    l_t(x_i, s)  = E_{X_t | X_0 = x_i} || -(X_t - alpha_t x_i)/sigma_t^2 - s(X_t, t) ||^2
    Loss-Gap_t   = (1/n) sum_i [ l_t(x_i, grad log p_t) - l_t(x_i, grad log p_hat_t) ]
    Fisher_t     = E_{X ~ P_hat_t} || grad log p_hat_t(X) - grad log p_t(X) ||^2          (= Loss-Gap_t, Prop. 4.1)
    Theorem 4.3: E_D[Loss-Gap_t] = Omega( d / sigma_t^2 + tr(Sigma) )  for t in [t_0, t_1]

Both estimators are plain Monte Carlo over the same sampling scheme, ``i ~ Uniform{1..n}`` and
``X_t = alpha_t x_i + sigma_t eps`` with ``eps ~ N(0, I)``, all draws i.i.d., so the reported standard error is the
textbook ``std / sqrt(N)``. In ``loss_gap`` both losses use the same ``eps`` (common random numbers): the
``||eps||^2 / sigma_t^2`` term, by far the largest, cancels exactly instead of adding variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import check_points, check_time_positive
from .empirical import EmpiricalScore
from .mixture import GaussianMixture
from .time import ou_alpha_sigma

ScoreFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class LossGapEstimate:
    """A Monte-Carlo estimate: ``value`` +- ``stderr`` (one standard error) from ``num_samples`` i.i.d. draws."""

    value: float
    stderr: float
    num_samples: int


def _noised_training_draws(train, t, num_samples, batch_size, generator):
    """Batches of ``(x_i, eps, X_t)`` with ``i`` uniform and ``X_t = alpha_t x_i + sigma_t eps``."""
    alpha, sigma = ou_alpha_sigma(t)
    for start in range(0, num_samples, batch_size):
        size = min(batch_size, num_samples - start)
        index = torch.randint(train.shape[0], (size,), generator=generator, device=train.device)
        noise = torch.randn(size, train.shape[1], generator=generator, dtype=train.dtype, device=train.device)
        clean = train[index]
        yield clean, noise, alpha * clean + sigma * noise


def _prepare(train, true_score, t, num_samples, batch_size, empirical_score, chunk_size):
    train = check_points(train, "train")
    t = check_time_positive(t)
    if not callable(true_score):
        raise TypeError("true_score must be a callable (x: Tensor[B, d], t: float) -> Tensor[B, d], "
                        "e.g. mixture.score.")
    if int(num_samples) < 2:
        raise ValueError(f"num_noise_samples must be >= 2 to estimate a standard error (got {num_samples}).")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer (got {batch_size}).")
    if empirical_score is None:
        empirical_score = EmpiricalScore(train, chunk_size=chunk_size)
    elif empirical_score.train.shape != train.shape:
        raise ValueError("empirical_score was built on a different training set; pass EmpiricalScore(train) or None.")
    return train, t, int(num_samples), int(batch_size), empirical_score


def _call_score(true_score, x, t):
    value = true_score(x, t)
    if not isinstance(value, torch.Tensor) or value.shape != x.shape:
        raise ValueError(f"true_score must return a tensor of the input's shape {tuple(x.shape)} "
                         f"(got {getattr(value, 'shape', type(value).__name__)}).")
    return value.to(x.dtype)


def _estimate(values: list) -> LossGapEstimate:
    values = torch.cat(values).double()
    return LossGapEstimate(float(values.mean()), float(values.std() / math.sqrt(values.numel())), values.numel())


def loss_gap(
    train: torch.Tensor,
    true_score: ScoreFn,
    t: float,
    num_noise_samples: int = 4096,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    empirical_score: EmpiricalScore | None = None,
    chunk_size: int | None = None,
) -> LossGapEstimate:
    """Monte-Carlo ``Loss-Gap_t``, straight from its definition (see the module docstring).

    Args:
        train: ``(n, d)`` training points ``x_1..x_n``.
        true_score: the population score ``(x, t) -> grad log p_t(x)``, e.g. ``GaussianMixture.score``.
        t: OU time ``> 0``.
        num_noise_samples: number ``N`` of i.i.d. pairs ``(i, eps)``.
        generator: torch generator on ``train``'s device, for reproducible draws.
        batch_size: pairs evaluated at once (memory ``O(batch_size x chunk_size)``).
        empirical_score: a prebuilt ``EmpiricalScore(train)`` to reuse across times (built when ``None``).
    """
    train, t, num_samples, batch_size, empirical = _prepare(
        train, true_score, t, num_noise_samples, batch_size, empirical_score, chunk_size)
    _, sigma = ou_alpha_sigma(t)
    differences = []
    for _, noise, noised in _noised_training_draws(train, t, num_samples, batch_size, generator):
        target = -noise / sigma  # = -(X_t - alpha_t x_i) / sigma_t^2, the DSM regression target
        loss_true = (target - _call_score(true_score, noised, t)).pow(2).sum(1)
        loss_empirical = (target - empirical.score(noised, t)).pow(2).sum(1)
        differences.append((loss_true - loss_empirical).cpu())
    return _estimate(differences)


def fisher_divergence(
    train: torch.Tensor,
    true_score: ScoreFn,
    t: float,
    num_noise_samples: int = 4096,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    empirical_score: EmpiricalScore | None = None,
    chunk_size: int | None = None,
) -> LossGapEstimate:
    """Monte-Carlo ``E_{X ~ P_hat_t} ||grad log p_hat_t(X) - grad log p_t(X)||^2`` (the expectation is under the
    EMPIRICAL noised distribution, as in Proposition 4.1). Arguments as in :func:`loss_gap`."""
    train, t, num_samples, batch_size, empirical = _prepare(
        train, true_score, t, num_noise_samples, batch_size, empirical_score, chunk_size)
    squared_errors = []
    for _, _, noised in _noised_training_draws(train, t, num_samples, batch_size, generator):
        error = empirical.score(noised, t) - _call_score(true_score, noised, t)
        squared_errors.append(error.pow(2).sum(1).cpu())
    return _estimate(squared_errors)


def theorem_4_3_lower_bound(mixture_or_dim: GaussianMixture | int, t, trace_cov: float | None = None):
    """The SHAPE ``d / sigma_t^2 + tr(Sigma)`` of Theorem 4.3's lower bound ``E_D[Loss-Gap_t] = Omega(...)``.

    The paper states the bound up to unspecified constants (and only for ``t`` in ``[t_0, t_1]`` with
    ``log sigma_{t_1} = O(-log d)``), so this is not a numerical lower bound: divide a measured gap by it to see
    whether the scaling holds (a ratio that stays roughly flat as ``t`` shrinks means it does).

    Args:
        mixture_or_dim: a :class:`GaussianMixture` (``d`` and ``tr(Sigma)``, the weighted mean of its components'
            traces, are read from it) or the dimension ``d`` as an int, then with ``trace_cov``.
        t: OU time(s) ``> 0``, float or tensor (the result has the same type).
        trace_cov: ``tr(Sigma)`` when a dimension is given (default ``d``, the identity covariance of the paper).
    """
    if isinstance(mixture_or_dim, GaussianMixture):
        dim, trace = mixture_or_dim.dim, mixture_or_dim.trace_cov if trace_cov is None else trace_cov
    elif isinstance(mixture_or_dim, int) and not isinstance(mixture_or_dim, bool) and mixture_or_dim > 0:
        dim, trace = mixture_or_dim, float(mixture_or_dim) if trace_cov is None else trace_cov
    else:
        raise TypeError(f"mixture_or_dim must be a GaussianMixture or a positive int dimension "
                        f"(got {mixture_or_dim!r}).")
    if isinstance(t, torch.Tensor):
        if not (torch.isfinite(t) & (t > 0)).all():
            raise ValueError("t must be finite and > 0: the bound d / sigma_t^2 diverges at t = 0.")
    else:
        t = check_time_positive(t)
    _, sigma = ou_alpha_sigma(t)
    return dim / sigma**2 + trace
