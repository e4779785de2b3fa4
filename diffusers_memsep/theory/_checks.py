"""Input checks shared by the theory modules: one clear error naming the problem and the fix."""

from __future__ import annotations

import torch


def check_points(x, name: str, dim: int | None = None) -> torch.Tensor:
    """``x`` as a finite floating tensor of shape ``(B, dim)`` with ``B >= 1``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim) (got {type(x).__name__}); "
                        "wrap it with torch.as_tensor.")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, dim) (got {tuple(x.shape)}); "
                         "flatten each point, e.g. x.reshape(len(x), -1).")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the model has dimension {dim}; "
                         "pass points of the same dimension as the mixture / training set.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one point.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (got {x.dtype}); convert it with .float() or .double().")
    if not torch.isfinite(x).all():
        raise ValueError(
            f"{name} contains NaN or inf; clean the data (e.g. drop rows with ~torch.isfinite(x).all(1))."
        )
    return x


def check_time_positive(t, name: str = "t") -> float:
    """``t`` as a positive finite float (a 0-d tensor is accepted)."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name} must be a single time (got a tensor of shape {tuple(t.shape)}); "
                             "loop over times or pass float(t).")
        t = t.item()
    t = float(t)
    if not t > 0 or t == float("inf"):
        raise ValueError(
            f"{name} must be a finite OU time > 0 (got {t}): the empirical score is singular at t = 0; "
            "stop early at a small positive time t_0 (for example 1e-3)."
        )
    return t
