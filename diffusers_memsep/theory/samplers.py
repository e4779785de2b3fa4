"""Samplers driven by any score ``(x: Tensor[B, d], t: float) -> Tensor[B, d]`` in the paper's OU time.

Both integrate from ``t_max`` (near pure noise when ``t_max`` is a few units) down to the early-stopping time
``t_min = t_0 > 0`` on a decreasing grid (:func:`~diffusers_memsep.theory.time.time_grid`, geometric by default).
Both are first-order exponential integrators written through Tweedie's denoiser
``D(x, t) = (x + sigma_t^2 score(x, t)) / alpha_t``, which is what makes them stable at the small times where the
empirical score is stiff (its Lipschitz constant grows like ``sigma_t^-4``, Lemma C.1):

- reverse SDE, ancestral step (DDPM): draw ``x_s`` from the exact Gaussian posterior ``q(x_s | x_t, x_0 = D)``;
- probability-flow ODE (DDIM): ``x_s = alpha_s D + sigma_s (x_t - alpha_t D) / sigma_t``.

Each step is exact when ``D`` is constant over the step (e.g. for data that is a single point). The output is the
sample at ``t_min``; with ``return_denoised=True`` it is instead ``D(x, t_min)``, the posterior mean at the last
time (one more score call), which removes the residual ``sigma_{t_min}`` noise.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ._checks import check_points
from .time import ou_alpha_sigma, time_grid

ScoreFn = Callable[[torch.Tensor, float], torch.Tensor]


def _denoised(score_fn: ScoreFn, x: torch.Tensor, t: float) -> torch.Tensor:
    alpha, sigma = ou_alpha_sigma(t)
    score = score_fn(x, t)
    if not isinstance(score, torch.Tensor) or score.shape != x.shape:
        raise ValueError(f"score_fn must return a tensor of the input's shape {tuple(x.shape)} "
                         f"(got {getattr(score, 'shape', type(score).__name__)}).")
    return (x + sigma**2 * score.to(x.dtype)) / alpha


def _run(score_fn, x_T, t_max, t_min, num_steps, spacing, return_denoised, step, progress):
    if not callable(score_fn):
        raise TypeError("score_fn must be a callable (x: Tensor[B, d], t: float) -> Tensor[B, d].")
    x = check_points(x_T, "x_T").clone()
    grid = time_grid(t_max, t_min, num_steps, spacing).tolist()
    steps = zip(grid[:-1], grid[1:])
    if progress:
        steps = tqdm(list(steps), desc="sampling", leave=False)
    for t, s in steps:
        # detach: a network's graph is never kept across steps (autograd inside score_fn still works)
        x = step(x, t, s, _denoised(score_fn, x, t)).detach()
    return _denoised(score_fn, x, grid[-1]) if return_denoised else x


def reverse_sde_sample(
    score_fn: ScoreFn,
    x_T: torch.Tensor,
    t_max: float,
    t_min: float,
    num_steps: int,
    generator: torch.Generator | None = None,
    spacing: str = "geometric",
    return_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Reverse OU SDE from ``x_T`` (``(B, d)``, usually ``torch.randn``) at ``t_max`` down to ``t_min``; ``(B, d)``.

    Ancestral step from ``t`` to ``s < t`` (``a = alpha``, ``v = sigma^2``, ``v_{t|s} = 1 - exp(-(t - s))``):
    ``x_s ~ N( (a_s v_{t|s} / v_t) D + (a_t / a_s) (v_s / v_t) x_t ,  v_{t|s} v_s / v_t )``.
    """

    def step(x, t, s, denoised):
        alpha_t, sigma_t = ou_alpha_sigma(t)
        alpha_s, sigma_s = ou_alpha_sigma(s)
        var_ts = -math.expm1(-(t - s))  # variance of X_t given X_s
        mean = (alpha_s * var_ts / sigma_t**2) * denoised + (alpha_t / alpha_s) * (sigma_s**2 / sigma_t**2) * x
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return mean + math.sqrt(var_ts * sigma_s**2 / sigma_t**2) * noise

    return _run(score_fn, x_T, t_max, t_min, num_steps, spacing, return_denoised, step, progress)


def probability_flow_ode_sample(
    score_fn: ScoreFn,
    x_T: torch.Tensor,
    t_max: float,
    t_min: float,
    num_steps: int,
    spacing: str = "geometric",
    return_denoised: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Probability-flow ODE ``dx/dt = -(x + score(x, t)) / 2`` from ``t_max`` down to ``t_min``, deterministic;
    ``(B, d)``. Step (DDIM): ``x_s = alpha_s D + sigma_s (x_t - alpha_t D) / sigma_t``."""

    def step(x, t, s, denoised):
        alpha_t, sigma_t = ou_alpha_sigma(t)
        alpha_s, sigma_s = ou_alpha_sigma(s)
        return alpha_s * denoised + (sigma_s / sigma_t) * (x - alpha_t * denoised)

    return _run(score_fn, x_T, t_max, t_min, num_steps, spacing, return_denoised, step, progress)
