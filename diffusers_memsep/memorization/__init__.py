"""Memorization and quality metrics: exact nearest-neighbour reference, the paper's 1/3 rule, precision/recall,
Frechet distance and the KID formula, and named feature spaces (digits classifier, population-trained CNN, FID)."""

from .copy_detection import (
    CopyDetectionNet,
    RegisteredPixelRule,
    combined_report,
    copy_detection_space,
    copy_report,
    pretrained_copy_space,
    registered_report,
)
from .features import (
    DIGITS_FEATURE_SPACE,
    FEATURE_SPACES,
    ConvFeatureExtractor,
    DigitsFeatureExtractor,
    FeatureSpace,
    load_digits_feature_extractor,
    resolve_feature_space,
)
from .index import NearestNeighborIndex, sharded_search
from .metrics import (
    MemorizationResult,
    frechet_distance,
    kernel_distance,
    memorization_ratio,
    memorization_report,
    mmd2_unbiased,
    precision_recall,
)
from .model_score import memorization_score

__all__ = [
    "NearestNeighborIndex",
    "sharded_search",
    "MemorizationResult",
    "memorization_report",
    "memorization_ratio",
    "precision_recall",
    "frechet_distance",
    "kernel_distance",
    "mmd2_unbiased",
    "FeatureSpace",
    "FEATURE_SPACES",
    "resolve_feature_space",
    "ConvFeatureExtractor",
    "DigitsFeatureExtractor",
    "load_digits_feature_extractor",
    "DIGITS_FEATURE_SPACE",
    "CopyDetectionNet", "copy_detection_space", "copy_report", "pretrained_copy_space", "memorization_score",
    "RegisteredPixelRule", "registered_report", "combined_report",
]
