"""An honest offline feature space for the embedded digits: a small CNN classifier trained on all of sklearn's digits.

The usual FID needs Inception-v3 (ImageNet weights, 299x299 RGB); on 8x8 grey digits those features are
meaningless and the weights are not available offline. Instead, quality on the embedded data is measured as the
**Frechet distance in digits-classifier feature space**: the 64-d penultimate activations of
:class:`DigitsFeatureExtractor`, a classifier trained on the full 1,797-image digits set by
``training/train_digits_features.py`` (weights shipped in ``diffusers_memsep/assets/digits_features.safetensors``).
Reports must use that name, never "FID".

Choices the recipe leaves open, and why:
- trained on the FULL digits set (every training subset n the memorization studies draw is inside it): the feature
  space should know every digit style it will be asked to compare; held-out accuracy of the same recipe (80/20
  split) is stored in the weights' metadata;
- features are the pre-activation penultimate layer (64-d): closer to Gaussian than post-ReLU activations, which
  suits the Gaussian fit of the Frechet distance;
- inputs are images in the model's data range ``[-1, 1]``, ``[B, 1, H, W]`` (RGB is averaged to grey); any H, W is
  area-resampled to 8x8, the resolution the classifier was trained at.
"""

from __future__ import annotations

import json
import os
from importlib import resources

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..utils import atomic_path
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "DigitsFeatureExtractor",
    "load_digits_feature_extractor",
    "train_digits_feature_extractor",
    "load_digits_dataset",
    "DIGITS_FEATURE_SPACE",
    "InceptionFeatureExtractor",
    "load_inception_feature_extractor",
]

DIGITS_FEATURE_SPACE = "digits-classifier feature space"
_ASSET = "digits_features.safetensors"


class DigitsFeatureExtractor(nn.Module):
    """Small CNN for 8x8 digits; ``forward`` returns 64-d features, ``logits`` the 10 class scores."""

    name = DIGITS_FEATURE_SPACE
    feature_dim = 64
    resolution = 8

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(64 * 2 * 2, self.feature_dim),
        )  # fmt: skip
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.feature_dim, num_classes))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"DigitsFeatureExtractor takes images [B, 1 or 3, H, W] in [-1, 1], got {shape}.")
        images = images.to(self.body[0].weight.device, torch.float32)
        if images.shape[1] == 3:
            images = images.mean(1, keepdim=True)
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.adaptive_avg_pool2d(images, self.resolution)  # area resampling to the training resolution
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits as ``[-1, 1]`` images ``[n, 1, 8, 8]`` (``x / 16 * 2 - 1``, as ``data.py``) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).mul(2.0).sub(1.0).unsqueeze(1)
    return images, torch.from_numpy(digits.target).long()


def load_digits_feature_extractor(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """The shipped (or a given) :class:`DigitsFeatureExtractor`, in eval mode, without gradients."""
    if path is None:
        path = resources.files("diffusers_memsep") / "assets" / _ASSET
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No digits feature-extractor weights at {path}; create them with `python training/train_digits_features.py`."
        )
    model = DigitsFeatureExtractor()
    model.load_state_dict(load_file(path))
    return model.to(device).eval().requires_grad_(False)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (zero = background padding) and light pixel noise."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy : dy + 8, dx : dx + 8]
    return shifted + 0.05 * torch.randn(shifted.shape, generator=generator)


def train_digits_feature_extractor(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 60,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> DigitsFeatureExtractor:
    """Train :class:`DigitsFeatureExtractor` with AdamW and cross-entropy (cosine learning-rate decay)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1.")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsFeatureExtractor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    bar = tqdm(total=steps, desc="digits classifier", disable=not progress)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = F.cross_entropy(model.logits(_augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsFeatureExtractor, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model.logits(images).argmax(1) == labels).float().mean().item()


def save_digits_feature_extractor(model: DigitsFeatureExtractor, path: str | os.PathLike, metadata: dict) -> None:
    """Write the weights as safetensors (atomically), with the recipe and accuracies as string metadata."""
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata={"format": "pt", **{k: json.dumps(v) for k, v in metadata.items()}})


# ------------------------------------------------------------------------------------------- Inception-v3 (FID)
class InceptionFeatureExtractor(nn.Module):
    """2048-d pool features of torchvision's Inception-v3, the feature space of FID (the CIFAR-10 path).

    Inputs are images in ``[-1, 1]``, ``[B, 1 or 3, H, W]``: grey is repeated to RGB, images are resized bilinearly
    to 299x299 and normalised with ImageNet statistics, as torchvision's weights expect. Note that the canonical FID
    implementation uses the TensorFlow Inception weights (pytorch-fid's ``pt_inception-2015-12-05``); torchvision's
    ``IMAGENET1K_V1`` weights give close but not identical numbers, so reports name which weights were used
    (``self.name``).
    """

    feature_dim = 2048

    def __init__(self, network: nn.Module, name: str):
        super().__init__()
        network.fc = nn.Identity()
        self.network = network.eval()
        self.name = name
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError("InceptionFeatureExtractor takes images [B, 1 or 3, H, W] in [-1, 1].")
        images = images.to(self.mean.device, torch.float32)
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        images = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.network(((images + 1) / 2 - self.mean) / self.std)


def load_inception_feature_extractor(
    weights_path: str | os.PathLike, device: str | torch.device = "cpu"
) -> InceptionFeatureExtractor:
    """Inception-v3 features for FID, from a local safetensors file (nothing is downloaded, no pickle is read).

    Args:
        weights_path: safetensors file holding a torchvision ``inception_v3(aux_logits=True)`` state dict, e.g.
            converted once from torchvision's ``IMAGENET1K_V1`` checkpoint with
            ``safetensors.torch.save_file(model.state_dict(), path)``.

    Raises ImportError without torchvision and FileNotFoundError without the weights: then report the Frechet
    distance in another named feature space (:func:`load_digits_feature_extractor` for the embedded digits).
    """
    try:
        from torchvision.models import inception_v3
    except ImportError as error:
        raise ImportError("FID needs torchvision's Inception-v3: `pip install torchvision` (matching your torch).") from error
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"No Inception-v3 weights at {weights_path}; convert torchvision's checkpoint to safetensors once, or "
            "report the Frechet distance in another named feature space."
        )
    network = inception_v3(weights=None, aux_logits=True, init_weights=False)
    network.load_state_dict(load_file(os.fspath(weights_path)))
    name = f"Inception-v3 pool features ({os.path.basename(os.fspath(weights_path))})"
    return InceptionFeatureExtractor(network, name).to(device).requires_grad_(False)
