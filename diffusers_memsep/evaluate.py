"""Evaluate pipelines side by side: sample with fixed seeds, compute every metric, write report rows and figures.

Every variant (original, pruned by each method, time-routed) is sampled from the SAME noise: the same generator
seed, class labels and batch layout, so differences between rows come from the models, not from the draws.

Metrics, and the choices behind them:
- memorization ratio: the paper's rule ``||x - x_(1)||^2 <= (1/9) ||x - x_(2)||^2`` against the training set;
- precision / recall (Kynkaanniemi et al. 2019, k = 3) and the Frechet distance, both in one feature space against
  ``real_images``: for 8x8 one-channel images (the embedded digits) the shipped digits classifier ("Frechet distance
  in digits-classifier feature space", never called FID); otherwise raw pixels ("pixel space"). ``real_images``
  should be the population (for the digits: all 1,797 images), not the training subset, so that a model that only
  reproduces its n training images is penalised in recall and Frechet distance.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.utils import BaseOutput

from .memorization import frechet_distance, memorization_report, precision_recall
from .memorization.features import DIGITS_FEATURE_SPACE, load_digits_feature_extractor
from .utils import save_figure

PIXEL_SPACE = "pixel space"
METRIC_COLUMNS = ("memorization_ratio", "precision", "recall", "frechet_distance")


@dataclass
class EvaluationResult(BaseOutput):
    """One evaluated variant. ``samples`` are in ``[-1, 1]``; ``nearest_index`` points into the training set."""

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
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The scalar fields, for CSV and markdown tables."""
        return {"name": self.name, **{k: getattr(self, k) for k in METRIC_COLUMNS}, "feature_space": self.feature_space,
                "num_samples": self.num_samples, "num_parameters": self.num_parameters,
                "sampling_seconds": round(self.sampling_seconds, 3), **self.extra}


def feature_space_for(images: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """``(features, name)`` used for precision/recall and the Frechet distance of images shaped like ``images``."""
    if tuple(images.shape[1:]) == (1, 8, 8):
        return load_digits_feature_extractor(), DIGITS_FEATURE_SPACE
    return None, PIXEL_SPACE


def balanced_labels(num_samples: int, num_classes: int | None) -> torch.Tensor | None:
    """``0, 1, ..., C-1, 0, 1, ...`` (same labels for every variant), or None for an unconditional model."""
    return None if not num_classes else torch.arange(num_samples) % num_classes


@torch.no_grad()
def sample_pipeline(pipe, num_samples: int, class_labels: torch.Tensor | None, num_inference_steps: int, seed: int,
                    batch_size: int = 256, **call_kwargs) -> tuple[torch.Tensor, float]:
    """``num_samples`` images in ``[-1, 1]`` and the seconds it took; batch ``i`` uses seed ``seed + i``."""
    chunks, start_time = [], time.perf_counter()
    for batch_index, start in enumerate(range(0, num_samples, batch_size)):
        size = min(batch_size, num_samples - start)
        labels = None if class_labels is None else class_labels[start:start + size]
        generator = torch.Generator(device="cpu").manual_seed(seed + batch_index)
        output = pipe(class_labels=labels, batch_size=None if labels is not None else size,
                      num_inference_steps=num_inference_steps, generator=generator, output_type="pt",
                      check_memorization=False, **call_kwargs)
        chunks.append(output.images.cpu() * 2 - 1)
    return torch.cat(chunks), time.perf_counter() - start_time


def evaluate_pipeline(pipe, name: str, train_images: torch.Tensor, real_images: torch.Tensor, num_samples: int = 256,
                      num_inference_steps: int = 50, seed: int = 0, class_labels: torch.Tensor | None = None,
                      batch_size: int = 256, features: Callable | None = None, feature_space: str | None = None,
                      **call_kwargs) -> EvaluationResult:
    """Sample ``pipe`` and measure memorization against ``train_images`` and quality against ``real_images``."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (precision/recall and the Frechet distance need it), got {num_samples}.")
    if features is None and feature_space is None:
        features, feature_space = feature_space_for(real_images)
    samples, seconds = sample_pipeline(pipe, num_samples, class_labels, num_inference_steps, seed, batch_size,
                                       **call_kwargs)
    report = memorization_report(samples, pipe.reference if pipe.reference is not None else train_images)
    real_features = _features(real_images, features)
    fake_features = _features(samples, features)
    precision, recall = precision_recall(real_features, fake_features, k=3)
    models = [pipe.transformer] + ([pipe.small_t_transformer] if getattr(pipe, "small_t_transformer", None) else [])
    return EvaluationResult(
        name=name, memorization_ratio=report.memorized.float().mean().item(), precision=precision, recall=recall,
        frechet_distance=frechet_distance(real_features, fake_features), feature_space=feature_space or PIXEL_SPACE,
        num_samples=num_samples, num_parameters=sum(m.num_parameters() for m in models), sampling_seconds=seconds,
        samples=samples, memorized=report.memorized.cpu(), nearest_index=report.nearest_index.cpu(),
    )


@torch.no_grad()
def _features(images: torch.Tensor, features: Callable | None) -> torch.Tensor:
    if features is None:
        return images.flatten(1).float()
    return torch.cat([features(images[i:i + 512]) for i in range(0, images.shape[0], 512)]).float().cpu()


# ------------------------------------------------------------------------------------------------ aggregation
def summarize(rows: Sequence[dict], group_by: Sequence[str] = ("method", "eta")) -> list[dict]:
    """Mean and standard deviation (over seeds) of every metric column, one row per group, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(key) for key in group_by), []).append(row)
    summary = []
    for key, members in groups.items():
        entry = dict(zip(group_by, key), runs=len(members))
        for column in (*METRIC_COLUMNS, "num_parameters", "sampling_seconds"):
            values = [float(m[column]) for m in members if m.get(column) is not None]
            if values:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                entry[column], entry[column + "_std"] = mean, std
        summary.append(entry)
    return summary


# -------------------------------------------------------------------------------------------------- writing
def markdown_table(summary: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``summary`` rows; metric columns show ``mean +- std`` when several runs were averaged."""
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in summary:
        cells = []
        for key, _ in columns:
            value, std = row.get(key), row.get(key + "_std")
            if key == "num_parameters" and value is not None:
                cells.append(f"{int(round(value)):,}")
            elif key == "eta" and value is not None:
                cells.append(f"{value:g}")
            elif isinstance(value, float):
                spread = std is not None and row.get("runs", 1) > 1
                cells.append(f"{value:.3f} +- {std:.3f}" if spread else f"{value:.3f}")
            else:
                cells.append("" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_memorization_vs_quality(summary: Sequence[dict], path: str | os.PathLike, feature_space: str) -> None:
    """Scatter: Frechet distance (x, lower is better) against memorization ratio (y), with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.6))
    for row in summary:
        label = row["method"] if row.get("eta") in (None, 0, 0.0) else f"{row['method']} (eta={row['eta']:g})"
        axis.errorbar(row["frechet_distance"], 100 * row["memorization_ratio"], xerr=row.get("frechet_distance_std", 0),
                      yerr=100 * row.get("memorization_ratio_std", 0), fmt="o", capsize=3, label=label)
    axis.set_xlabel(f"Frechet distance in {feature_space} (lower is better)")
    axis.set_ylabel("memorization ratio (%)")
    axis.set_title("Memorization vs quality (mean +- std over seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_samples_with_nearest(results: Sequence[EvaluationResult], train_images: torch.Tensor,
                              path: str | os.PathLike, num_columns: int = 12) -> None:
    """The paper's Figure 4 layout: per variant, a row of samples (same noise) and below it their nearest training
    images; memorized samples are framed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
