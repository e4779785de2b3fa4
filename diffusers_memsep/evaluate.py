"""Evaluate pipelines side by side: sample with fixed seeds, compute every metric, write report rows and figures.

Every variant (original, pruned by each method, time-routed) is sampled from the SAME noise: the same generator
seed, class labels and batch layout, so differences between rows come from the models, not from the draws.

Metrics, and the choices behind them:
- memorization ratio (``memorized``): the paper's rule ``||x - x_(1)||^2 <= (1/9) ||x - x_(2)||^2`` against the
  training set, in pixel space, on the first ``num_samples`` samples;
- ``memorized_features`` (beyond the paper): the same rule in the quality feature space (sample features against
  the training images' features), which also catches copies that differ by small pixel shifts or noise;
- precision / recall (Kynkaanniemi et al. 2019, k = 3), the Frechet distance and the KID formula (Binkowski et al.
  2018: unbiased MMD^2, cubic polynomial kernel, mean and standard error over subsets; outside the Inception space
  on features centred and scaled with the population's statistics, see :meth:`QualityReference.kid_features`),
  all in one named :class:`~diffusers_memsep.memorization.FeatureSpace`, on the first ``num_quality_samples``
  samples, against the POPULATION (for the digits: all 1,797 images; for a folder or dataset: every image of it),
  never the training subset: a model that only reproduces its n training images must lose recall and gain Frechet
  distance and KID. The population's features are computed once (:class:`QualityReference`) and shared by every row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import matplotlib
import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .data import TrainingData
from .distributed import all_gather_cat, is_main_process, split_work
from .memorization import (
    NearestNeighborIndex,
    frechet_distance,
    kernel_distance,
    memorization_report,
    precision_recall,
)
from .memorization.features import FeatureSpace, digits_feature_space, resolve_feature_space
from .utils import save_figure

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402

PIXEL_SPACE = "pixel space"
METRIC_COLUMNS = ("memorization_ratio", "memorization_ratio_features", "precision", "recall", "frechet_distance",
                  "kid", "kid_se")


@dataclass
class EvaluationResult(BaseOutput):
    """One evaluated variant. ``samples`` are in ``[-1, 1]``; ``nearest_index`` points into the training set.

    ``memorization_ratio`` is the pixel-space rule (``memorized``), ``memorization_ratio_features`` the same rule in
    the feature space (``memorized_features``); ``kid`` / ``kid_se`` the KID formula's mean and standard error.
    """

    name: str
    memorization_ratio: float
    precision: float
    recall: float
    frechet_distance: float
    feature_space: str
    num_samples: int
    num_parameters: int
    sampling_seconds: float
    samples: torch.Tensor
    memorized: torch.Tensor
    nearest_index: torch.Tensor
    memorization_ratio_features: float = float("nan")
    memorized_features: torch.Tensor | None = None
    kid: float = float("nan")
    kid_se: float = float("nan")
    num_nonfinite: int = 0  # samples with NaN/Inf values: left out of both memorization ratios, never "not copies"
    num_quality_samples: int = 0
    num_real_images: int = 0
    denoising_steps_per_sample: float = float("nan")  # sampler steps per returned sample (copy-free: above plain's)
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The scalar fields, for CSV and markdown tables."""
        return {"name": self.name, **{k: getattr(self, k) for k in METRIC_COLUMNS},
                "feature_space": self.feature_space,
                "num_samples": self.num_samples, "num_nonfinite": self.num_nonfinite,
                "num_quality_samples": self.num_quality_samples, "num_real_images": self.num_real_images,
                "num_parameters": self.num_parameters, "denoising_steps_per_sample": self.denoising_steps_per_sample,
                "sampling_seconds": round(self.sampling_seconds, 3), **self.extra}


@dataclass
class QualityReference:
    """The population in a feature space, computed once: what every evaluated row is compared with.

    Attributes:
        feature_space: the named space.
        real_features: ``[N, D]`` features of the N population images.
        train_features: index over the training images' features (for ``memorized_features``).
        source: where the population comes from, for reports.
    """

    feature_space: FeatureSpace
    real_features: torch.Tensor
    train_features: NearestNeighborIndex
    source: str = "the population"

    @property
    def num_real_images(self) -> int:
        return self.real_features.shape[0]

    def kid_features(self, features: torch.Tensor) -> torch.Tensor:
        """Features as the KID formula sees them: raw in the Inception space (standard KID); elsewhere centred on the
        population's mean and divided by its root-mean-square standard deviation (one scale for all dimensions, so
        that a dimension constant over the population cannot blow up), so that ``x.y / d`` is of order one, as for
        Inception pool features (raw pre-activation features of the small CNNs have norms in the tens, where the
        cubic kernel is ruled by a handful of samples and the estimate swings by orders of magnitude)."""
        if self.feature_space.key == "inception":
            return features
        scale = self.real_features.var(0).mean().sqrt().clamp_min(1e-8)
        return (features - self.real_features.mean(0)) / scale

    @classmethod
    def build(cls, feature_space: FeatureSpace, real_images: torch.Tensor, train_images: torch.Tensor,
              source: str = "the population") -> "QualityReference":
        if real_images.shape[0] < 4:
            raise ValueError(f"the population holds {real_images.shape[0]} images; precision/recall (k = 3) need at "
                             "least 4: point the population at the whole data set.")
        return cls(feature_space, feature_space(real_images),
                   NearestNeighborIndex.from_images(feature_space(train_images)), source)


def feature_space_for(images: torch.Tensor) -> FeatureSpace:
    """Default space when none is chosen: the digits classifier for 8x8 one-channel images, else a small CNN
    trained on ``images`` (in memory; commands resolve and cache it with ``--feature_space``)."""
    if tuple(images.shape[1:]) == (1, 8, 8):
        return digits_feature_space()
    return resolve_feature_space("trained", TrainingData(images, None, None, "population"))


#: The seed scheme of every sampled number, here and nowhere else. Run seed ``s`` (``0 <= s < MAX_RUN_SEED``)
#: evaluates with batch ``b`` seeded ``EVALUATION_SEED_STRIDE * s + b`` (at most ``EVALUATION_SEED_STRIDE`` batches),
#: so evaluations use seeds below ``CURVE_SEED``. Samples that CHOOSE weights draw from the curve range instead:
#: batch ``b`` of the early-stop curve of ``memsep study`` and of the trainer's validation under
#: ``stop_at_memorization`` is seeded ``CURVE_SEED + b``, above every evaluation seed, so the samples that choose a
#: checkpoint are never the samples that score it. A plain validation (no early stopping: it chooses nothing, its
#: grids only show progress) seeds batch ``b`` with ``TrainingConfig.seed + b`` (:func:`validation_seed`).
EVALUATION_SEED_STRIDE = 1000
MAX_RUN_SEED = 10**6
CURVE_SEED = EVALUATION_SEED_STRIDE * MAX_RUN_SEED


def evaluation_seed(seed: int) -> int:
    """The first sampling seed of run seed ``seed`` (see :data:`EVALUATION_SEED_STRIDE`)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_RUN_SEED:
        raise ValueError(f"seeds must be integers in [0, {MAX_RUN_SEED:,}) (the evaluation draws from seed 1000 * s), "
                         f"got {seed!r}.")
    return EVALUATION_SEED_STRIDE * seed


def validation_seed(seed: int, chooses_weights: bool) -> int:
    """The first sampling seed of the trainer's validation of a run with seed ``seed``: :data:`CURVE_SEED` when the
    validation chooses the weights (``stop_at_memorization``), else ``seed`` (see :data:`EVALUATION_SEED_STRIDE`)."""
    return CURVE_SEED if chooses_weights else int(seed)


def balanced_labels(num_samples: int, num_classes: int | None) -> torch.Tensor | None:
    """The one label rule: ``0, 1, ..., C-1, 0, 1, ...`` (same labels for every variant), None when unconditional."""
    return None if not num_classes else torch.arange(num_samples) % num_classes


class Samples(NamedTuple):
    """What :func:`sample_pipeline` returns."""

    images: torch.Tensor  # [N, C, H, W] in [-1, 1]
    seconds: float  # wall time of the sampling
    denoising_steps: torch.Tensor  # [N] sampler steps spent per sample (MemSepPipelineOutput.denoising_steps)
    memorization_score: torch.Tensor | None = None  # [N] with call_kwargs memorization_score=... (MemSepPipeline)


@torch.no_grad()
def sample_pipeline(pipe, num_samples: int, class_labels: torch.Tensor | None, num_inference_steps: int, seed: int,
                    batch_size: int = 256, scheduler=None, split_across_processes: bool = True,
                    progress: bool = False, **call_kwargs) -> Samples:
    """THE sampler of every memorization and quality number (evaluation, training validation, early-stop curve):
    ``num_samples`` images in ``[-1, 1]``, the seconds it took and the sampler steps each sample cost (more than
    ``num_inference_steps`` under copy-free sampling, ``call_kwargs`` ``avoid_copies=True``); batch ``i`` uses seed
    ``seed + i``. With ``memorization_score=...`` among ``call_kwargs`` the pipeline's model-only scores come back too
    (each batch's from a generator derived from the batch's). ``progress``: a bar over this process's batches on the
    main process.

    ``scheduler`` (default: the pipeline's) is used for this call only. Under several processes (``accelerate
    launch`` / ``torchrun``) the batches are split across them (contiguous shares, each batch keeping its seed) and
    gathered in order, so every process returns the samples one process would draw, after sampling only its share.
    Every process must then call it; ``split_across_processes=False`` samples every batch on the calling process
    alone (the trainer's validation, which runs on the main process only), with the same seeds and result.
    """
    batches = list(enumerate(range(0, num_samples, batch_size)))
    if len(batches) > EVALUATION_SEED_STRIDE:
        raise ValueError(f"{num_samples} samples in batches of {batch_size} need more than {EVALUATION_SEED_STRIDE} "
                         "seeds and would reuse another run's noise; raise batch_size.")
    chunks, steps, scores, start_time = [], [], [], time.perf_counter()
    original = pipe.scheduler if scheduler is not None else None
    if scheduler is not None:
        pipe.scheduler = scheduler
    try:
        shares = split_work(batches) if split_across_processes else batches
        for batch_index, start in tqdm(shares, desc="sampling", disable=not progress or not is_main_process()):
            size = min(batch_size, num_samples - start)
            labels = None if class_labels is None else class_labels[start:start + size]
            generator = torch.Generator(device="cpu").manual_seed(seed + batch_index)
            output = pipe(class_labels=labels, batch_size=None if labels is not None else size,
                          num_inference_steps=num_inference_steps, generator=generator, output_type="pt",
                          check_memorization=bool(call_kwargs.get("avoid_copies")
                                                  or call_kwargs.get("copy_check_at") is not None), **call_kwargs)
            chunks.append(output.images.cpu() * 2 - 1)
            spent = getattr(output, "denoising_steps", None)  # None from a stock pipeline: plain sampling
            steps.append(spent.cpu() if spent is not None
                         else torch.full((size,), num_inference_steps, dtype=torch.long))
            if getattr(output, "memorization_score", None) is not None:
                scores.append(output.memorization_score.cpu())
    finally:
        if scheduler is not None:
            pipe.scheduler = original
    gather = all_gather_cat if split_across_processes else (lambda rows: rows)
    samples, spent = gather(torch.cat(chunks) if chunks else None), gather(torch.cat(steps) if steps else None)
    score = gather(torch.cat(scores) if scores else None) if call_kwargs.get("memorization_score") else None
    return Samples(samples, time.perf_counter() - start_time, spent, score)


def evaluate_pipeline(pipe, name: str, train_images: torch.Tensor, real_images: torch.Tensor | QualityReference,
                      num_samples: int = 256, num_inference_steps: int = 50, seed: int = 0,
                      class_labels: torch.Tensor | None = None, batch_size: int = 256,
                      feature_space: FeatureSpace | str | None = None, num_quality_samples: int | None = None,
                      kid_subsets: int = 100, **call_kwargs) -> EvaluationResult:
    """Sample ``pipe``; measure memorization against ``train_images`` and quality against the population.

    Args:
        real_images: the population images, or a :class:`QualityReference` built once for many calls.
        feature_space: the quality space (a :class:`FeatureSpace` or a choice for
            :func:`~diffusers_memsep.memorization.resolve_feature_space`); ignored with a ``QualityReference``.
        num_samples: samples for the memorization ratios. num_quality_samples: samples for precision/recall,
            Frechet distance and KID (default ``num_samples``). ``max`` of both is drawn once; each metric uses the
            first ones, so every variant is measured on the same noise.
        class_labels: labels of all ``max(num_samples, num_quality_samples)`` samples, or None.
    """
    num_quality_samples = num_quality_samples or num_samples
    if num_samples < 1 or num_quality_samples < 4:
        raise ValueError(f"num_samples must be >= 1 and num_quality_samples >= 4 (precision/recall use k = 3), got "
                         f"{num_samples} and {num_quality_samples}.")
    total = max(num_samples, num_quality_samples)
    if class_labels is not None and len(class_labels) < total:
        raise ValueError(f"class_labels holds {len(class_labels)} labels for {total} samples; give one per sample.")
    reference = real_images
    if not isinstance(reference, QualityReference):
        if isinstance(feature_space, str):
            feature_space = resolve_feature_space(feature_space, TrainingData(real_images, None, None, "population"))
        reference = QualityReference.build(feature_space or feature_space_for(real_images), real_images, train_images)
    drawn = sample_pipeline(pipe, total, class_labels, num_inference_steps, seed, batch_size, **call_kwargs)
    samples, seconds, steps_spent = drawn.images, drawn.seconds, drawn.denoising_steps
    report = memorization_report(samples[:num_samples], pipe.reference if pipe.reference is not None else train_images)
    quality = quality_metrics(samples[:num_quality_samples], reference, kid_subsets=kid_subsets, seed=seed)
    in_features = memorization_report(reference.feature_space(samples[:num_samples]), reference.train_features)
    models = [pipe.transformer] + ([pipe.small_t_transformer] if getattr(pipe, "small_t_transformer", None) else [])
    return EvaluationResult(
        name=name, memorization_ratio=report.ratio, precision=quality["precision"],
        recall=quality["recall"], frechet_distance=quality["frechet_distance"], feature_space=quality["feature_space"],
        num_samples=num_samples, num_parameters=sum(m.num_parameters() for m in models), sampling_seconds=seconds,
        samples=samples[:num_samples], memorized=report.memorized.cpu(), nearest_index=report.nearest_index.cpu(),
        memorization_ratio_features=in_features.ratio, num_nonfinite=report.num_nonfinite,
        memorized_features=in_features.memorized.cpu(), kid=quality["kid"], kid_se=quality["kid_se"],
        num_quality_samples=num_quality_samples, num_real_images=reference.num_real_images,
        denoising_steps_per_sample=float(steps_spent.float().mean()),
    )


def quality_metrics(samples: torch.Tensor, reference: QualityReference, kid_subsets: int = 100,
                    seed: int = 0) -> dict:
    """Precision, recall, Frechet distance and the KID formula (mean, ``kid_se``) of ``samples`` (``[-1, 1]``)
    against the population in ``reference``; also the space's name and ``num_real_images``, for logs and rows.
    Used by :func:`evaluate_pipeline` and usable as is by a training-time validation."""
    if samples.shape[0] < 4:
        raise ValueError(f"quality metrics need at least 4 samples (precision/recall use k = 3), got "
                         f"{samples.shape[0]}.")
    fake_features = reference.feature_space(samples)
    precision, recall = precision_recall(reference.real_features, fake_features, k=3)
    kid, kid_se = kernel_distance(reference.kid_features(reference.real_features),
                                  reference.kid_features(fake_features), num_subsets=kid_subsets, seed=seed)
    return {"precision": precision, "recall": recall,
            "frechet_distance": frechet_distance(reference.real_features, fake_features), "kid": kid,
            "kid_se": kid_se, "feature_space": reference.feature_space.name,
            "num_real_images": reference.num_real_images}


# -------------------------------------------------------------------------------------------------- figures
def plot_samples_with_nearest(results: Sequence[EvaluationResult], train_images: torch.Tensor,
                              path: str | os.PathLike, num_columns: int = 12) -> None:
    """The paper's Figure 4 layout: per variant, a row of samples (same noise) and below it their nearest training
    images; memorized samples are framed in red."""
    num_columns = min(num_columns, min(r.samples.shape[0] for r in results))
    figure, axes = plt.subplots(2 * len(results), num_columns, figsize=(0.8 * num_columns, 1.7 * len(results)),
                                squeeze=False)
    for row, result in enumerate(results):
        for column in range(num_columns):
            for offset, image in enumerate((result.samples[column], train_images[result.nearest_index[column]])):
                axis = axes[2 * row + offset, column]
                picture = (image.float().clamp(-1, 1) + 1) / 2
                axis.imshow(picture.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
                axis.set_xticks([])
                axis.set_yticks([])
                if offset == 0 and bool(result.memorized[column]):
                    for spine in axis.spines.values():
                        spine.set_edgecolor("red")
                        spine.set_linewidth(2.5)
            if column == 0:
                axes[2 * row, 0].set_ylabel(result.name, fontsize=7, rotation=0, ha="right", va="center")
                axes[2 * row + 1, 0].set_ylabel("nearest\ntrain", fontsize=7, rotation=0, ha="right", va="center")
    figure.suptitle("Samples from the same noise (red frame: memorized) and their nearest training images", fontsize=9)
    save_figure(figure, path)
