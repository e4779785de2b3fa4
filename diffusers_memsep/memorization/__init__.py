"""Memorization and quality metrics: exact nearest-neighbour reference, the paper's 1/3 rule, precision/recall,
Frechet distance with a pluggable feature extractor, and an honest offline feature space for the embedded digits."""

from .features import (
    DIGITS_FEATURE_SPACE,
    DigitsFeatureExtractor,
    InceptionFeatureExtractor,
    load_digits_feature_extractor,
    load_inception_feature_extractor,
)
from .index import NearestNeighborIndex, sharded_search
from .metrics import (
    MemorizationResult,
    frechet_distance,
    memorization_ratio,
    memorization_report,
    precision_recall,
)

__all__ = [
    "NearestNeighborIndex",
    "sharded_search",
    "MemorizationResult",
    "memorization_report",
    "memorization_ratio",
    "precision_recall",
    "frechet_distance",
    "DigitsFeatureExtractor",
    "load_digits_feature_extractor",
    "InceptionFeatureExtractor",
    "load_inception_feature_extractor",
    "DIGITS_FEATURE_SPACE",
]
