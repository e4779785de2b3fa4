"""The paper's Ornstein-Uhlenbeck time and its link to a diffusers scheduler's timestep index.

The forward process is ``dX_t = -X_t/2 dt + dB_t``, so ``X_t | X_0 = x ~ N(alpha_t x, sigma_t^2 I)`` with
``alpha_t = exp(-t/2)`` and ``sigma_t^2 = 1 - exp(-t)``. A DDPM-type diffusers schedule is the same family with a
discrete index ``k``: ``alpha_t^2 = alphas_cumprod[k]``, hence ``t = -log(alphas_cumprod[k])``. "Small time" always
means "little noise". This module is the ONLY place of the project that converts between the two clocks.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

TimeLike = Union[float, int, torch.Tensor]


def _check_time(t: TimeLike, name: str = "t", allow_zero: bool = True) -> None:
    values = t if isinstance(t, torch.Tensor) else torch.tensor(float(t))
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite (got {t!r}); pass an OU time in (0, inf).")
    bad = (values < 0) if allow_zero else (values <= 0)
    if bad.any():
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{name} must be {bound} (got {t!r}): the score is singular at t = 0 for a finite training set; "
            "stop early at a small positive time t_0 (for example 1e-3) instead."
        )


def ou_alpha_sigma(t: TimeLike) -> tuple:
    """``(alpha_t, sigma_t)`` of the OU process at time ``t`` (float -> floats, tensor -> tensors of t's shape).

    ``alpha_t = exp(-t/2)`` and ``sigma_t = sqrt(1 - exp(-t))``; ``sigma_t`` is computed with ``expm1`` so that it
    stays accurate for tiny ``t`` (``sigma_t ~ sqrt(t)``). ``t = 0`` is allowed here (``sigma_0 = 0``); the scores
    themselves reject it.
    """
    _check_time(t)
    if isinstance(t, torch.Tensor):
        return torch.exp(-0.5 * t), torch.sqrt(-torch.expm1(-t))
    t = float(t)
    return math.exp(-0.5 * t), math.sqrt(-math.expm1(-t))


def _as_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    if hasattr(alphas_cumprod, "alphas_cumprod"):  # a diffusers scheduler was passed
        alphas_cumprod = alphas_cumprod.alphas_cumprod
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(
            f"alphas_cumprod must be a non-empty 1-D sequence (got shape {tuple(alphas_cumprod.shape)}); "
            "pass scheduler.alphas_cumprod or the scheduler itself."
        )
    if not ((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all():
        raise ValueError("alphas_cumprod must lie in (0, 1]; pass scheduler.alphas_cumprod of a DDPM-type scheduler.")
    return alphas_cumprod


def ou_time_from_alphas_cumprod(alphas_cumprod, timesteps) -> torch.Tensor:
    """OU time ``t = -log(alphas_cumprod[k])`` of the diffusers timestep indices ``timesteps`` (float64 tensor).

    ``alphas_cumprod`` may be the tensor or the scheduler itself; ``timesteps`` an int, a sequence or a tensor of
    indices into it (fractional timesteps are rounded to the nearest index).
    """
    alphas_cumprod = _as_alphas_cumprod(alphas_cumprod)
    index = torch.as_tensor(timesteps, device="cpu")
    index = index.round().long() if index.is_floating_point() else index.long()
    if ((index < 0) | (index >= alphas_cumprod.numel())).any():
        raise ValueError(
            f"timesteps must be indices in [0, {alphas_cumprod.numel() - 1}] (got {timesteps!r}); "
            "use scheduler.timesteps values or clamp them to the schedule's length."
        )
    return -torch.log(alphas_cumprod[index])


def timesteps_from_ou_time(alphas_cumprod, t: TimeLike) -> torch.Tensor:
    """Index ``k`` of the schedule whose OU time ``-log(alphas_cumprod[k])`` is nearest to ``t`` (long tensor).

    "Nearest" is measured in OU time (equivalently in ``log alpha_t^2``), the clock in which the paper states its
    results; times beyond the ends of the schedule map to its first or last index.
    """
    _check_time(t)
    times = -torch.log(_as_alphas_cumprod(alphas_cumprod))  # increasing for a DDPM schedule
    t = torch.as_tensor(t, dtype=torch.float64)
    return (times[None, :] - t.reshape(-1, 1)).abs().argmin(dim=1).reshape(t.shape)


def time_grid(t_max: float, t_min: float, num_steps: int, spacing: str = "geometric") -> torch.Tensor:
    """Decreasing float64 grid ``t_max = t_0' > ... > t_num_steps = t_min`` used by the samplers.

    ``"geometric"`` (default) spaces points evenly in ``log t``, so half of the steps are spent where the noise is
    small and the empirical score changes fastest; ``"uniform"`` spaces them evenly in ``t``.
    """
    _check_time(t_min, "t_min", allow_zero=False)
    _check_time(t_max, "t_max", allow_zero=False)
    if not t_max > t_min:
        raise ValueError(f"t_max must exceed t_min (got t_max={t_max}, t_min={t_min}); "
                         "sampling runs from noise to data.")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be a positive integer (got {num_steps}).")
    if spacing == "geometric":
        return torch.logspace(math.log10(t_max), math.log10(t_min), int(num_steps) + 1, dtype=torch.float64)
    if spacing == "uniform":
        return torch.linspace(t_max, t_min, int(num_steps) + 1, dtype=torch.float64)
    raise ValueError(f"spacing must be 'geometric' or 'uniform' (got {spacing!r}).")


def timesteps_from_fraction(fraction: TimeLike, num_train_timesteps: int) -> torch.Tensor:
    """Timestep index ``k = min(floor(u * N), N - 1)`` of normalised diffusion time ``u in [0, 1]`` (long tensor).

    ``u`` is the fraction of the scheduler's ``N = num_train_timesteps`` training timesteps (0 = least noise). This
    is the normalisation the project uses for the paper's ``T = Beta(0.8, 2)`` on ``[0, 1]`` (Algorithm 2): a
    fraction of the timestep range, not of OU time, which the paper's DiT experiments would not define.
    """
    fraction = torch.as_tensor(fraction, dtype=torch.float64)
    if not ((fraction >= 0) & (fraction <= 1)).all():
        raise ValueError(f"normalised times must lie in [0, 1] (got {fraction!r}); "
                         "they are fractions of the timesteps.")
    if int(num_train_timesteps) < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
    return (fraction * num_train_timesteps).floor().long().clamp_max(int(num_train_timesteps) - 1)


__all__: Sequence[str] = [
    "timesteps_from_fraction",
    "ou_alpha_sigma",
    "ou_time_from_alphas_cumprod",
    "timesteps_from_ou_time",
    "time_grid",
]
