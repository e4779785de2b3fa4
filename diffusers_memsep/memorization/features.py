"""Feature spaces for the quality metrics (precision/recall, Frechet distance, KID formula), chosen once and named.

Every quality number is a distance between the population and the samples *in some feature space*, and only one of
them may be called FID. :func:`resolve_feature_space` turns a choice into a :class:`FeatureSpace`:

- ``"digits"``: the shipped digits classifier, :class:`DigitsFeatureExtractor` (64-d penultimate activations of a
  small CNN trained on all 1,797 sklearn digits by ``training/train_digits_features.py``, weights in
  ``diffusers_memsep/assets/digits_features.safetensors``): "Frechet distance in digits-classifier feature space".
  The default for the embedded digits.
- ``"trained"``: the offline default for any other image folder or dataset: the same small CNN, generalised to any
  channel count and resolution (:class:`ConvFeatureExtractor`), trained on the POPULATION images, a classifier when
  the population has class labels, rotation prediction (which of 0/90/180/270 degrees an image was turned by)
  otherwise. It is cached beside the outputs (``model.safetensors`` + ``recipe.json`` with its held-out accuracy)
  and reused while the population is the same: "Frechet distance in <data>-trained features".
- ``"inception"``: the standard FID feature space, 2048-d pool features of Inception-v3 with the FID weights (the
  TensorFlow 2015-12-05 graph, converted), through torch-fidelity's ``FeatureExtractorInceptionV3`` (optional extra
  ``pip install diffusers-memsep[fid]``). Only this space is called "FID".
- ``"pixels"``: raw pixels, for comparison only (a rank-deficient covariance when samples < pixels).

Choices the paper leaves open, and why:
- torch-fidelity rather than clean-fid or torchmetrics for FID: torch-fidelity's extractor is the reference
  PyTorch port of the TensorFlow FID graph (bit-exact TF1 bilinear resize, FID weights), and it is the very network
  that torchmetrics' FrechetInceptionDistance/KernelInceptionDistance wrap; calling it directly yields the features
  themselves, which the precision/recall, KID and feature-space memorization rows need too, without torchmetrics'
  metric state. clean-fid loads a TorchScript graph by URL through ``requests`` and needs torchvision as well.
  Every one of the three imports torchvision, which is why FID is an optional extra and not a dependency.
- images enter Inception as 8-bit RGB (``[-1, 1]`` -> ``round(255 (x + 1) / 2)``, grey repeated to RGB), as if the
  samples had been saved as PNG files, which is how FID is computed in the literature;
- the digits classifier is trained on the FULL digits set (every training subset is inside it); its held-out
  accuracy (80/20 split of the same recipe) is stored in the weights' metadata; features are the pre-activation
  penultimate layer (closer to Gaussian than post-ReLU activations, which suits the Frechet distance's Gaussian fit);
- the population-trained network holds out 10% of the population to measure its accuracy (stored in the recipe),
  and works at a fixed resolution of 8, 16 or 32 pixels (the largest not above the data's; 8 for smaller data),
  so that it trains in well under a minute on a CPU for a few thousand images.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import EMBEDDED_DATASET
from ..utils import atomic_path, write_text

__all__ = [
    "FEATURE_SPACES",
    "FeatureSpace",
    "resolve_feature_space",
    "ConvFeatureExtractor",
    "DigitsFeatureExtractor",
    "load_digits_feature_extractor",
    "train_digits_feature_extractor",
    "train_feature_extractor",
    "load_digits_dataset",
    "digits_feature_space",
    "pixel_feature_space",
    "trained_feature_space",
    "inception_feature_space",
    "find_inception_weights",
    "DIGITS_FEATURE_SPACE",
    "FID_WEIGHTS_FILE",
]

DIGITS_FEATURE_SPACE = "digits-classifier feature space"
FEATURE_SPACES = ("auto", "digits", "trained", "inception", "pixels")
_ASSET = "digits_features.safetensors"
#: The FID weights as torch-fidelity names them (pytorch-fid's copy of the same weights: ``pt_inception-...``).
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_FID_WEIGHTS_ALIASES = (FID_WEIGHTS_FILE, "pt_inception-2015-12-05-6726825d.pth")
_INSTALL_FID = "pip install 'diffusers-memsep[fid]'"


# ------------------------------------------------------------------------------------------- the named space
@dataclass
class FeatureSpace:
    """A named map from images ``[B, C, H, W]`` in ``[-1, 1]`` to feature vectors ``[B, D]``.

    Attributes:
        key: ``"digits"``, ``"trained"``, ``"inception"`` or ``"pixels"``.
        name: how reports name the space, e.g. ``"digits-classifier feature space"``.
        extractor: the network (None: flattened pixels).
        details: provenance written beside the numbers (weights file, recipe, accuracy).
    """

    key: str
    name: str
    extractor: Callable[[torch.Tensor], torch.Tensor] | None = None
    details: dict = field(default_factory=dict)
    batch_size: int = 256

    @property
    def frechet_title(self) -> str:
        """"FID" in the Inception space, "Frechet distance in <name>" everywhere else."""
        return "FID" if self.key == "inception" else f"Frechet distance in {self.name}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features of ``images`` in batches, as float32 on the CPU."""
        if self.extractor is None:
            return images.flatten(1).float().cpu()
        chunks = [self.extractor(images[start:start + self.batch_size]).float().cpu()
                  for start in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks).flatten(1)


def resolve_feature_space(choice: str, population, cache_dir: str | os.PathLike | None = None,
                          inception_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                          progress: bool = False, **train_kwargs) -> FeatureSpace:
    """The :class:`FeatureSpace` for ``choice`` (one of :data:`FEATURE_SPACES`) on ``population``.

    Args:
        population: a :class:`~diffusers_memsep.data.TrainingData` holding the WHOLE population (its ``images``,
            ``labels`` and ``source``); ``"trained"`` learns its features from it, ``"auto"`` looks at its source.
        cache_dir: where the ``"trained"`` network is cached and reused (None: trained in memory, not kept).
        inception_weights: the FID weights file for ``"inception"`` (default: torch's hub cache).
        train_kwargs: passed to :func:`train_feature_extractor` for ``"trained"`` (e.g. ``num_steps``).

    ``"auto"`` is ``"digits"`` for the embedded digits (one channel, any resolution: the classifier resamples to
    8x8) and ``"trained"`` for everything else. Raises ValueError / FileNotFoundError / ImportError with a one-line
    message naming the fix, before any expensive work.
    """
    if choice not in FEATURE_SPACES:
        raise ValueError(f"feature space must be one of {', '.join(FEATURE_SPACES)}, got {choice!r}.")
    if choice == "auto":
        digits = population.source.startswith(EMBEDDED_DATASET) and population.images.shape[1] == 1
        choice = "digits" if digits else "trained"
    if choice == "digits":
        return digits_feature_space(device)
    if choice == "pixels":
        return pixel_feature_space()
    if choice == "inception":
        return inception_feature_space(inception_weights, device=device)
    return trained_feature_space(population.images, population.labels, _data_name(population.source), cache_dir,
                                 device=device, progress=progress, **train_kwargs)


def _data_name(source: str) -> str:
    """``"/data/flowers (all 812 images)"`` -> ``"flowers"``; ``"cifar10/plain (...)"`` -> ``"cifar10/plain"``."""
    name = source.split(" (")[0]
    return Path(name).name if Path(name).is_dir() else name


def pixel_feature_space() -> FeatureSpace:
    return FeatureSpace("pixels", "pixel space")


def digits_feature_space(device: str | torch.device = "cpu") -> FeatureSpace:
    return FeatureSpace("digits", DIGITS_FEATURE_SPACE, load_digits_feature_extractor(device=device),
                        {"weights": f"diffusers_memsep/assets/{_ASSET}"})


# ----------------------------------------------------------------------------------------- small CNN features
def working_resolution(resolution: int) -> int:
    """8, 16 or 32: the largest not above ``resolution`` (8 for smaller images)."""
    return max(8, min(32, 2 ** int(math.log2(max(resolution, 1)))))


class ConvFeatureExtractor(nn.Module):
    """Small CNN for images of any size; ``forward`` returns 64-d features, ``logits`` the ``num_outputs`` scores.

    Inputs are resampled to :func:`working_resolution` (area average when larger, bilinear when smaller); two 3x3
    convolutions (``width``, then ``2 width`` channels) and a pool, then (conv, pool) blocks halve the side down to
    2x2; a linear layer gives the 64 features. The digits classifier is the case (1 channel, 8x8, width 32).
    """

    feature_dim = 64
    name = "small-CNN feature space"

    def __init__(self, in_channels: int = 1, resolution: int = 8, num_outputs: int = 10, width: int | None = None):
        super().__init__()
        self.in_channels, self.resolution, self.num_outputs = in_channels, working_resolution(resolution), num_outputs
        # narrower at higher resolution, so that a training step costs about the same at 8, 16 and 32 pixels
        self.width = width or {8: 32, 16: 16, 32: 8}[self.resolution]
        wide = 2 * self.width
        layers = [nn.Conv2d(in_channels, self.width, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(self.width, wide, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        side = self.resolution // 2
        while side > 2:
            layers += [nn.Conv2d(wide, wide, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            side //= 2
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(wide * 2 * 2, self.feature_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.feature_dim, num_outputs))

    def architecture(self) -> dict:
        return {"in_channels": self.in_channels, "resolution": self.resolution, "num_outputs": self.num_outputs,
                "width": self.width}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__} takes images [B, 1 or 3, H, W] in [-1, 1], got {shape}.")
        images = images.to(self.body[0].weight.device, torch.float32)
        if images.shape[1] != self.in_channels:  # grey <-> RGB
            images = images.mean(1, keepdim=True) if self.in_channels == 1 else images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (self.resolution, self.resolution):
            if min(images.shape[-2:]) >= self.resolution:
                images = F.adaptive_avg_pool2d(images, self.resolution)  # area resampling
            else:
                images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                       align_corners=False)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


class DigitsFeatureExtractor(ConvFeatureExtractor):
    """The 8x8 one-channel case of :class:`ConvFeatureExtractor`, with the 10 digit classes (shipped weights)."""

    name = DIGITS_FEATURE_SPACE

    def __init__(self, num_classes: int = 10):
        super().__init__(in_channels=1, resolution=8, num_outputs=num_classes)


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 sklearn digits as ``[-1, 1]`` images ``[n, 1, 8, 8]`` (``x / 16 * 2 - 1``, as ``data.py``) and
    labels."""
    from sklearn.datasets import load_digits  # here: scikit-learn takes seconds to import

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
            f"No digits feature-extractor weights at {path}; create them with "
            "`python training/train_digits_features.py`."
        )
    model = DigitsFeatureExtractor()
    model.load_state_dict(load_file(path))
    return model.to(device).eval().requires_grad_(False)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (zero = background padding) and light pixel noise."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy : dy + height, dx : dx + width]
    return shifted + 0.05 * torch.randn(shifted.shape, generator=generator)


def _rotate(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Each image turned by its own multiple of 90 degrees (square images)."""
    turned = images.clone()
    for k in range(1, 4):
        chosen = quarter_turns == k
        if chosen.any():
            turned[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return turned


def _fit(model: ConvFeatureExtractor, images: torch.Tensor, labels: torch.Tensor | None, epochs: int, batch_size: int,
         learning_rate: float, seed: int, progress: bool, desc: str) -> ConvFeatureExtractor:
    """AdamW + cross-entropy with cosine decay; targets are ``labels``, or the rotation when ``labels`` is None."""
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1.")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images = model.preprocess(images)  # once, at the working resolution
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            inputs = _augment(images[batch], generator)
            if labels is None:
                targets = torch.randint(0, 4, (len(batch),), generator=generator)
                inputs = _rotate(inputs, targets)
            else:
                targets = labels[batch]
            loss = F.cross_entropy(model.logits(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


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
    torch.manual_seed(seed)
    return _fit(DigitsFeatureExtractor(), images, labels, epochs, batch_size, learning_rate, seed, progress,
                "digits classifier")


@torch.no_grad()
def accuracy(model: ConvFeatureExtractor, images: torch.Tensor, labels: torch.Tensor | None) -> float:
    """Class accuracy, or (``labels`` None) rotation accuracy over all four turns of every image."""
    if labels is None:
        images = model.preprocess(images)
        turns = torch.arange(4).repeat_interleave(len(images))
        return (model.logits(_rotate(images.repeat(4, 1, 1, 1), turns)).argmax(1) == turns).float().mean().item()
    return (model.logits(images).argmax(1) == labels).float().mean().item()


def train_feature_extractor(images: torch.Tensor, labels: torch.Tensor | None = None, num_steps: int = 400,
                            batch_size: int = 64, learning_rate: float = 2e-3, holdout_fraction: float = 0.1,
                            seed: int = 0, progress: bool = False) -> tuple[ConvFeatureExtractor, dict]:
    """Train a :class:`ConvFeatureExtractor` on ``images``: a classifier on ``labels`` (when they hold two classes
    or more), rotation prediction otherwise. Returns the model and its recipe (objective, held-out accuracy, time).

    ``holdout_fraction`` of the images (seeded) are kept out of training to measure the accuracy; the step budget
    is rounded to whole epochs (at least 2).
    """
    if labels is not None and labels.unique().numel() < 2:
        labels = None
    num_outputs = 4 if labels is None else int(labels.max()) + 1
    objective = "rotation prediction (4 classes)" if labels is None else f"classification ({num_outputs} classes)"
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    num_holdout = max(1, int(round(holdout_fraction * len(images)))) if len(images) >= 10 else 0
    holdout, train = order[:num_holdout], order[num_holdout:]
    epochs = max(2, math.ceil(num_steps / math.ceil(len(train) / batch_size)))
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = ConvFeatureExtractor(images.shape[1], images.shape[-1], num_outputs)
    _fit(model, images[train], None if labels is None else labels[train], epochs, batch_size, learning_rate, seed,
         progress, "feature network")
    seconds = time.perf_counter() - start
    holdout_labels = None if labels is None else labels[holdout]
    seen = train[:2048]  # training accuracy on at most 2,048 images
    recipe = {"objective": objective, "architecture": model.architecture(), "epochs": epochs,
              "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
              "num_train_images": len(train), "num_holdout_images": num_holdout,
              "holdout_accuracy": accuracy(model, images[holdout], holdout_labels) if num_holdout else None,
              "train_accuracy": accuracy(model, images[seen], None if labels is None else labels[seen]),
              "train_seconds": round(seconds, 2)}
    return model.requires_grad_(False), recipe


def _fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(labels.cpu().long().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def trained_feature_space(images: torch.Tensor, labels: torch.Tensor | None, data_name: str,
                          cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                          progress: bool = False, **train_kwargs) -> FeatureSpace:
    """"<data_name>-trained features": a :class:`ConvFeatureExtractor` trained on the population ``images``.

    With ``cache_dir``, the network is stored there (``model.safetensors`` + ``recipe.json``) and reused whenever
    the recipe's fingerprint (a hash of the population images and labels) matches, whatever ``train_kwargs`` are:
    one population, one feature space, so that reports of several runs stay comparable.
    """
    fingerprint = _fingerprint(images, labels)
    cache = Path(cache_dir) if cache_dir is not None else None
    recipe = None
    if cache is not None and (cache / "recipe.json").is_file() and (cache / "model.safetensors").is_file():
        stored = json.loads((cache / "recipe.json").read_text())
        if stored.get("population_fingerprint") == fingerprint:
            model = ConvFeatureExtractor(**stored["architecture"])
            model.load_state_dict(load_file(cache / "model.safetensors"))
            recipe = stored
    if recipe is None:
        model, recipe = train_feature_extractor(images, labels, progress=progress, **train_kwargs)
        recipe.update(population_fingerprint=fingerprint, num_population_images=len(images), data=data_name,
                      settings=train_kwargs)
        if cache is not None:
            with atomic_path(cache / "model.safetensors") as temporary:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(temporary),
                          metadata={"format": "pt"})
            write_text(cache / "recipe.json", json.dumps(recipe, indent=2) + "\n")  # last: marks the cache complete
    model = model.to(device).eval().requires_grad_(False)
    details = {k: recipe.get(k) for k in ("objective", "holdout_accuracy", "num_population_images", "train_seconds")}
    if cache is not None:
        details["cache"] = str(cache)
    return FeatureSpace("trained", f"{data_name}-trained features", model, details)


def save_digits_feature_extractor(model: DigitsFeatureExtractor, path: str | os.PathLike, metadata: dict) -> None:
    """Write the weights as safetensors (atomically), with the recipe and accuracies as string metadata."""
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata={"format": "pt", **{k: json.dumps(v) for k, v in metadata.items()}})


# --------------------------------------------------------------------------------------------- Inception (FID)
class InceptionFeatures(nn.Module):
    """FID features: images in ``[-1, 1]`` -> 8-bit RGB -> ``network`` -> 2048-d pool features.

    ``network`` follows torch-fidelity's ``FeatureExtractorInceptionV3`` interface: it takes ``uint8`` images
    ``[B, 3, H, W]`` (any size; it resizes to 299x299 itself, as TensorFlow 1 did) and returns a tuple whose first
    entry is the ``[B, 2048]`` feature batch.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError("Inception features take images [B, 1 or 3, H, W] in [-1, 1].")
        device = next(self.network.parameters()).device
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # as if saved to PNG
        pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
        output = self.network(pixels.to(device))
        return (output[0] if isinstance(output, (tuple, list)) else output).float()


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """The FID weights file: ``weights_path``, else torch's hub cache (``<torch hub dir>/checkpoints``), where
    torch-fidelity (and pytorch-fid, under the name ``pt_inception-...``) put the downloaded file."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no Inception weights file at {path}; pass the path of {FID_WEIGHTS_FILE} "
                                    "(the FID weights) to --inception_weights.")
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in _FID_WEIGHTS_ALIASES:
        if (cache / name).is_file():
            return cache / name
    raise FileNotFoundError(f"the FID weights {FID_WEIGHTS_FILE} are not in {cache} and cannot be downloaded offline; "
                            "put the file there or pass --inception_weights PATH.")


def inception_feature_space(weights_path: str | os.PathLike | None = None, network: nn.Module | None = None,
                            device: str | torch.device = "cpu") -> FeatureSpace:
    """The FID feature space. ``network``: a stand-in following torch-fidelity's interface (tests); by default
    torch-fidelity's ``FeatureExtractorInceptionV3`` with the FID weights from :func:`find_inception_weights`."""
    details = {"network": "stand-in network"}
    if network is None:
        path = find_inception_weights(weights_path)
        network = _fidelity_inception(path)
        details = {"network": "torch-fidelity FeatureExtractorInceptionV3", "weights": path.name}
    extractor = InceptionFeatures(network.to(device).eval().requires_grad_(False))
    return FeatureSpace("inception", "Inception-v3 (FID) feature space", extractor, details, batch_size=64)


def _fidelity_inception(path: Path) -> nn.Module:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # optional (fid extra)
    except Exception as error:  # ImportError, or RuntimeError from a torchvision built for another torch
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImportError(f"feature space 'inception' (FID) needs torch-fidelity and a torchvision matching torch "
                          f"{torch.__version__} ({reason}); {_INSTALL_FID}.") from error
    try:  # torch-fidelity unpickles the file itself: first make sure it holds nothing but tensors
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a plain PyTorch state dict of tensors ({type(error).__name__}); use "
                         f"{FID_WEIGHTS_FILE} as torch-fidelity distributes it.") from error
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
