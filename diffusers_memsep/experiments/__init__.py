"""Experiments that reproduce the paper's figures as reusable tools (they sit above ``theory`` and ``memorization``).

``gmm``: the approximation separation on Gaussian mixtures (Figures 2-3, Theorem 5.1) and the measured capacity
threshold; ``gmm_figures``: the suite behind ``memsep gmm`` (CSV + PNG).
"""

from .gmm import (
    GMMRunResult,
    GMMRunSpec,
    GMMScoreMLP,
    GMMTrainConfig,
    ThresholdFit,
    capacity_thresholds,
    evaluate_samples,
    fit_threshold_growth,
    generate_samples,
    gmm_dsm_loss,
    make_mixture,
    parse_sweep_argument,
    run_gmm_experiment,
    run_sweep,
    sample_diffusion_times,
    sweep_specs,
    train_score_mlp,
)
from .gmm_figures import SCALES, draw_gmm_suite, replot_gmm_suite, run_gmm_suite, run_gmm_sweep, suite_specs

__all__ = [
    "GMMRunResult",
    "GMMRunSpec",
    "GMMScoreMLP",
    "SCALES",
    "ThresholdFit",
    "GMMTrainConfig",
    "capacity_thresholds",
    "draw_gmm_suite",
    "gmm_dsm_loss",
    "evaluate_samples",
    "fit_threshold_growth",
    "generate_samples",
    "make_mixture",
    "parse_sweep_argument",
    "replot_gmm_suite",
    "run_gmm_experiment",
    "run_gmm_suite",
    "run_gmm_sweep",
    "run_sweep",
    "sample_diffusion_times",
    "suite_specs",
    "sweep_specs",
    "train_score_mlp",
]
