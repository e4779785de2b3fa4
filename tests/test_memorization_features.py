"""Tests of the digits feature space shipped in diffusers_memsep/assets (and the Inception path when available)."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_memsep.memorization import frechet_distance, precision_recall
from diffusers_memsep.memorization.features import (
    DIGITS_FEATURE_SPACE,
    load_digits_dataset,
    load_digits_feature_extractor,
)


@pytest.fixture(scope="module")
def extractor():
    return load_digits_feature_extractor()


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_shipped_classifier_recognises_digits(extractor, digits):
    images, labels = digits
    with torch.no_grad():
        accuracy = (extractor.logits(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.97
    assert extractor.name == DIGITS_FEATURE_SPACE == "digits-classifier feature space"


def test_features_shape_and_resolution_invariance(extractor, digits):
    images = digits[0][:64]
    features = extractor(images)
    assert features.shape == (64, 64) and not features.requires_grad
    upsampled = F.interpolate(images, scale_factor=2, mode="nearest")  # a 16x16 pipeline of the same digits
    torch.testing.assert_close(extractor(upsampled), features)
    assert extractor(images.expand(-1, 3, -1, -1)).shape == (64, 64)  # RGB is averaged to grey
    with pytest.raises(ValueError, match=r"\[B, 1 or 3, H, W\]"):
        extractor(images[0])


def test_frechet_distance_in_digits_space_separates_digits_from_noise(extractor, digits):
    images = digits[0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    first, second = images[order[:800]], images[order[800:1600]]
    noise = torch.rand(800, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    same = frechet_distance(first, second, features=extractor)
    different = frechet_distance(first, noise, features=extractor)
    assert same * 10 < different
    # copies of 20 digits: precision stays high (they are real digits), recall collapses
    copies = first[:20].repeat(40, 1, 1, 1)
    with torch.no_grad():
        precision, recall = precision_recall(extractor(second), extractor(copies))
    assert precision > 0.9 and recall < 0.2


def test_missing_weights_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits_features.py"):
        load_digits_feature_extractor(tmp_path / "missing.safetensors")
