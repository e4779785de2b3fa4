"""The paper's statistical separation, computable: OU time, exact mixture scores, the empirical (memorizing) score,
Loss-Gap_t = Fisher divergence (Proposition 4.1), the shape of Theorem 4.3, and samplers driven by any score.

Ground floor of the package: imports nothing else of ``diffusers_memsep``.
"""

from .empirical import EmpiricalScore
from .figure1 import loss_gap_curve, plot_loss_gap_curve, write_loss_gap_csv
from .loss_gap import LossGapEstimate, fisher_divergence, loss_gap, theorem_4_3_lower_bound
from .mixture import GaussianMixture
from .samplers import probability_flow_ode_sample, reverse_sde_sample
from .time import (
    ou_alpha_sigma,
    ou_time_from_alphas_cumprod,
    time_grid,
    timesteps_from_fraction,
    timesteps_from_ou_time,
)

__all__ = [
    "EmpiricalScore",
    "GaussianMixture",
    "LossGapEstimate",
    "fisher_divergence",
    "loss_gap",
    "loss_gap_curve",
    "ou_alpha_sigma",
    "ou_time_from_alphas_cumprod",
    "plot_loss_gap_curve",
    "probability_flow_ode_sample",
    "reverse_sde_sample",
    "theorem_4_3_lower_bound",
    "time_grid",
    "timesteps_from_fraction",
    "timesteps_from_ou_time",
    "write_loss_gap_csv",
]
