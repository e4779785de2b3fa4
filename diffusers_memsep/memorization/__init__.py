"""Memorization and quality metrics: exact nearest-neighbour reference, the paper's 1/3 rule, precision/recall,
Frechet distance and an honest offline feature space for the embedded digits data."""

from .index import NearestNeighborIndex
from .metrics import (
    MemorizationResult,
    frechet_distance,
    memorization_ratio,
    memorization_report,
    precision_recall,
)

__all__ = [
    "NearestNeighborIndex",
    "MemorizationResult",
    "memorization_report",
    "memorization_ratio",
    "precision_recall",
    "frechet_distance",
]
