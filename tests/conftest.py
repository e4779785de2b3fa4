"""The tiny DiTs and the random training set the tests share, as builders (plain functions, also imported by the
torchrun worker of ``test_distributed.py``, which runs outside pytest) and as fixtures."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from PIL import Image

from diffusers_memsep import PrunableDiTTransformer2DModel
from diffusers_memsep.data import TrainingData


def write_random_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """An image folder of ``count`` random ``size`` x ``size`` RGB PNGs (``000.png``, ...), made and returned."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


#: 3 layers of 4 heads on 8x8 grey images, 10 classes: small enough for brute force, enough heads to rank.
TWELVE_HEAD_CONFIG = dict(num_attention_heads=4, attention_head_dim=8, in_channels=1, num_layers=3, sample_size=8,
                          patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)


def tiny_dit(in_channels=1, learned_sigma=True, seed=0, sample_size=8, num_classes=10) -> DiTTransformer2DModel:
    """A stock DiT of 2 layers of 2 heads, as initialised, in eval mode: for pipelines and commands."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                                 out_channels=2 * in_channels if learned_sigma else in_channels, num_layers=2,
                                 sample_size=sample_size, patch_size=2, num_embeds_ada_norm=num_classes,
                                 norm_num_groups=1).eval()


def twelve_head_dit() -> DiTTransformer2DModel:
    """A stock DiT of :data:`TWELVE_HEAD_CONFIG` with every weight perturbed, in eval mode: DiT zero-initialises its
    adaLN gates, which would hide every attention head from the head scores."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**TWELVE_HEAD_CONFIG)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def random_training_data() -> TrainingData:
    """24 uniform random 8x8 grey images in [-1, 1] with random labels of 10 classes."""
    generator = torch.Generator().manual_seed(5)
    return TrainingData(images=torch.rand(24, 1, 8, 8, generator=generator) * 2 - 1,
                        labels=torch.randint(0, 10, (24,), generator=generator), num_classes=10, source="random")


@pytest.fixture
def stock_dit() -> DiTTransformer2DModel:
    return twelve_head_dit()


@pytest.fixture
def prunable_dit(stock_dit) -> PrunableDiTTransformer2DModel:
    return PrunableDiTTransformer2DModel.from_dit(stock_dit)


@pytest.fixture
def training_data() -> TrainingData:
    return random_training_data()
