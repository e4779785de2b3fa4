"""Audit a diffusion model for copies: does THIS model copy THESE images, which ones, and how badly?

:func:`audit_pipeline` samples a pipeline (a ``MemSepPipeline``, or a stock ``DiTPipeline`` loaded through it) and
reports, with 95% intervals:

- memorization by the paper's rule in pixel space (Ye et al. 2025, Section 4: nearest training image at most 1/3 as
  far as the second nearest) and by the calibrated rule of the copy-detection space
  (:mod:`~diffusers_memsep.memorization.copy_detection`), both when training images are known, and beside them the
  registered pixel rule (pixel distance after aligning each training image by small shifts, a mirror and zooms) and
  the combined rule (copy space OR registered rule) when enough held-out images calibrate them;
- the model-only score (:func:`~diffusers_memsep.memorization.model_score.memorization_score`), which needs no
  training image (with them, also its ROC AUC against the pixel rule's labels); with ``score_method="extraction"``,
  the paper's rule against the training images the model itself reproduces, extracted once per audit
  (``"renoise"`` when nothing can be extracted, and the report says so);
- how many samples copy each training image (which images leak), and a gallery of the worst copies beside their
  training images;
- quality against the population when one is given (precision/recall, Frechet distance, KID formula).

:func:`write_audit` writes ``report.md``, ``audit.json`` (every number) and the figures atomically.

Data-parallel (``torchrun`` / ``accelerate launch``, every process calling :func:`audit_pipeline`): the sampling
batches and their model-only scores are split across the processes (contiguous shares, each batch keeping its seed)
and gathered in order, the measures that follow run on the main process alone (the copy-space network is trained
and cached once), and every process returns the same numbers, those of one process; :func:`write_audit` writes on
the main process only.

Choices the paper leaves open, and why:
- the held-out images that calibrate the copy-space threshold are the population images the copy network never
  saw (its recipe's held-out share; the whole population for a pretrained network), minus the training images
  (matched exactly); without a population the threshold of the copy space's recipe is used and the report says so;
- the registered and combined rules are reported only when at least :data:`MIN_CALIBRATION_IMAGES` held-out images
  calibrate them (they have no recipe threshold to fall back on); every threshold is split-conformal at 1%
  (:func:`~diffusers_memsep.memorization.copy_detection.conformal_count`: the report states the false-positive rate
  it promises on new images, above 1% with fewer than 99 held-out images); the combined rule thresholds the larger
  of the two standardised scores (``calibrate_combined``'s default), the one combination measured in
  ``scripts/measure_detection.py`` to keep its false positives at 1% on every setting while catching >= 95% of
  every edit; its false-positive rate on the held-out images is the rate on the images that calibrate it, like the
  copy space's (the promise is the number to read);
- the copy-detection network is trained on the population (or, without one, on the training images themselves)
  and cached in ``<output_dir>/feature_network/copy_space``, reused while the images are the same;
- intervals: Wilson score intervals for shares (samples are independent draws of the model), bootstrap for AUC;
- the gallery shows the samples most similar to a training image in the copy space (pixel distance ratio without
  one), worst first;
- sampling batch ``b`` (of ``batch_size`` samples) is seeded ``seed + b`` and the model-only score of
  its samples is computed with it, by the pipeline (``memorization_score=``, seeded from the batch's generator): the
  numbers depend on the seed and the batch size, not on how many processes share the batches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .distributed import is_main_process, main_process_result
from .evaluate import balanced_labels, sample_pipeline
from .memorization.copy_detection import (
    SSCD_THRESHOLD,
    RegisteredPixelRule,
    calibrate_combined,
    calibrate_copy_threshold,
    conformal_count,
    copy_detection_space,
    copy_report,
    max_similarity,
    pretrained_copy_space,
    promised_false_positive_rate,
    threshold_below,
    wilson_interval,
)
from .memorization.metrics import memorization_report
from .memorization.model_score import THRESHOLDS, check_method_options, resolve_extraction
from .utils import save_figure, write_text

__all__ = ["AuditResult", "audit_pipeline", "write_audit", "MIN_CALIBRATION_IMAGES"]

#: Fewest held-out images that calibrate a threshold (fewer: the copy space keeps its recipe's threshold, and the
#: registered and combined rules are not reported).
MIN_CALIBRATION_IMAGES = 20


@dataclass
class AuditResult:
    """Every number of an audit (``numbers``, JSON-ready) and the tensors the figures need."""

    numbers: dict
    samples: torch.Tensor  # [B, C, H, W] in [-1, 1]
    train_images: torch.Tensor | None = None
    gallery: list = field(default_factory=list)  # (sample row, training row, label)


def _share(count: int, total: int) -> dict:
    low, high = wilson_interval(count, total)
    return {"share": count / total if total else float("nan"), "low": low, "high": high, "count": count,
            "total": total}


def _sample(pipe, num_samples: int, num_inference_steps: int, seed: int, batch_size: int, progress: bool,
            score_method: str, score_options: dict):
    """The samples in ``[-1, 1]``, their model-only scores and labels, from the one sampler
    (:func:`~diffusers_memsep.evaluate.sample_pipeline`: batches split across processes, each keeping its seed
    ``seed + b``, gathered in order on every process)."""
    conditional = pipe.config.get("label_dropout_prob") != 1 and pipe.num_classes > 1
    labels = balanced_labels(num_samples, pipe.num_classes if conditional else None)
    pipe.set_progress_bar_config(disable=True)
    drawn = sample_pipeline(pipe, num_samples, labels, num_inference_steps, seed, batch_size, progress=progress,
                            memorization_score=score_method, memorization_score_kwargs=score_options)
    return drawn.images, drawn.memorization_score, labels


def _held_out(population: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """The population images that are not training images (exact matches removed)."""
    distances = torch.cdist(population.flatten(1), train.flatten(1))
    return population[distances.min(1).values > 1e-6]


def audit_pipeline(pipe, train_images: torch.Tensor | None = None, population: torch.Tensor | None = None,
                   num_samples: int = 64, num_inference_steps: int = 25, seed: int = 0,
                   score_method: str = "renoise", copy_model: str | None = None,
                   cache_dir: str | os.PathLike | None = None, quality_space=None, gallery_size: int = 8,
                   batch_size: int = 64, copy_steps: int = 1500, progress: bool = True,
                   score_options: dict | None = None) -> AuditResult:
    """Sample ``pipe`` and measure its copies (see the module docstring).

    Args:
        train_images: the training images ``[n, C, H, W]`` in ``[-1, 1]`` at the pipeline's output shape (None:
            the pipeline's own reference if it has one, else only the model-only score is reported).
        population: every image of the data source (training images included), at the same shape: the copy space
            is trained on it, its non-training images calibrate the copy threshold, and quality is measured on it.
        copy_model: a transformers ``AutoModel`` folder or Hub id for a pretrained copy space (default: the
            contrastive network trained on the population for ``copy_steps`` steps).
        quality_space: a :class:`~diffusers_memsep.memorization.FeatureSpace` for the quality metrics (with
            ``population``; None: no quality).
        batch_size: samples per pipeline call; each batch has its own seed (see "Choices"), and the batches are
            what several processes share.
        score_options: options of ``score_method`` (``model_score.METHOD_OPTIONS``), e.g. ``{"repeats": 32}``.

    Under several processes every process must call it (with the same arguments); see the module docstring.
    """
    if num_samples < 4 or num_inference_steps < 1 or gallery_size < 0 or batch_size < 1:
        raise ValueError("num_samples must be >= 4, num_inference_steps >= 1, gallery_size >= 0 and batch_size >= 1.")
    score_options = dict(score_options or {})
    check_method_options(score_method, score_options)  # before any sampling
    score_method, score_options, extracted = _extract_once(pipe, score_method, score_options)
    if train_images is None and pipe.reference is not None:
        train_images = pipe.reference.images.float().cpu()
    samples, scores, labels = _sample(pipe, num_samples, num_inference_steps, seed, batch_size, progress,
                                      score_method, score_options)
    if train_images is not None:
        train_images = pipe.match_image_shape(train_images)
    numbers, gallery = main_process_result(lambda: _measure(
        pipe, samples, scores, train_images, population, num_inference_steps, seed, batch_size, score_method,
        copy_model, cache_dir, quality_space, gallery_size, copy_steps, progress, score_options, extracted))
    return AuditResult(numbers, samples, train_images, gallery)


def _extract_once(pipe, score_method: str, score_options: dict):
    """For ``"extraction"``, extract the training images once (every batch is then judged against the same ones;
    seeded, so every process extracts the same), or fall back to ``"renoise"`` and its threshold, as
    :func:`~diffusers_memsep.memorization.model_score.resolve_extraction` decides. Returns the method, its options and
    the number of extracted images (None for other methods)."""
    if score_method != "extraction":
        return score_method, score_options, None
    method, options, extracted = resolve_extraction(pipe, score_options)
    return method, options, 0 if extracted is None else len(extracted.images)


def _measure(pipe, samples, scores, train_images, population, num_inference_steps, seed, batch_size, score_method,
             copy_model, cache_dir, quality_space, gallery_size, copy_steps, progress,
             score_options, extracted=None) -> tuple[dict, list]:
    """Every number of the audit and its gallery, from the gathered samples and scores (main process only)."""
    num_samples = len(samples)
    numbers = {"pipeline": {"image_shape": list(pipe.image_shape), "num_classes": pipe.num_classes,
                            "latent": pipe.vae is not None},
               "sampling": {"num_samples": num_samples, "num_inference_steps": num_inference_steps, "seed": seed,
                            "batch_size": batch_size, "scheduler": type(pipe.scheduler).__name__}}

    threshold = THRESHOLDS[score_method]
    numbers["model_score"] = {"method": score_method, "threshold": threshold, "extracted_images": extracted,
                              "options": {k: v for k, v in score_options.items() if k != "extracted"},
                              "flagged": _share(int((scores >= threshold).sum()), num_samples),
                              "scores": scores.tolist()}
    gallery = []
    if train_images is None:
        numbers["training_images"] = None
        order = scores.argsort(descending=True)[:gallery_size].tolist()
        gallery = [(row, None, f"score {scores[row]:.4f}") for row in order]
        return numbers, gallery

    numbers["training_images"] = len(train_images)
    pixel = memorization_report(samples, train_images)
    numbers["pixel"] = {"rule": "paper's 1/3 rule, pixel space",
                        "memorized": _share(int(pixel.memorized.sum()), num_samples),
                        "distance_ratio": pixel.distance_ratio.tolist(),
                        "nearest_index": pixel.nearest_index.tolist()}

    if copy_model is not None:
        space = pretrained_copy_space(copy_model)
    else:
        space = copy_detection_space(population if population is not None else train_images, cache_dir,
                                     progress=progress, num_steps=copy_steps)
    held_out = None
    if population is not None:  # images the copy network never saw, without the training images
        unseen = population if space.holdout_indices is None else population[space.holdout_indices]
        held_out = _held_out(unseen, train_images)
    threshold_source = "the copy space's recipe (no held-out images given)"
    if copy_model is not None:
        threshold_source = f"SSCD's {SSCD_THRESHOLD} (no held-out images given)"
    if held_out is not None and len(held_out) >= MIN_CALIBRATION_IMAGES:
        space.threshold = calibrate_copy_threshold(space, train_images, held_out)
        threshold_source = _calibration_source(len(held_out))
    copies = copy_report(space, samples, train_images)
    numbers["copy_space"] = {"space": space.name, "details": space.details, "threshold": copies.threshold,
                             "threshold_source": threshold_source,
                             "copied": _share(int(copies.copied.sum()), num_samples),
                             "copied_at_sscd_0.5": _share(int((copies.similarity >= SSCD_THRESHOLD).sum()),
                                                          num_samples),
                             "ratio_rule_in_space": _share(int(copies.ratio_copied.sum()), num_samples),
                             "similarity": copies.similarity.tolist(), "nearest_index": copies.nearest_index.tolist()}
    if held_out is not None and len(held_out):
        flagged = copy_report(space, held_out, train_images).copied
        numbers["copy_space"]["held_out_false_positives"] = _share(int(flagged.sum()), len(held_out))
    numbers.update(_registered_and_combined(space, samples, train_images, held_out, copies))

    truth = pixel.memorized.numpy().astype(bool)
    if truth.any() and (~truth).any():
        from sklearn.metrics import roc_auc_score  # only when both classes occur

        values = scores.numpy()
        rng = np.random.default_rng(0)
        boot = []
        for _ in range(500):
            pick = rng.integers(0, len(values), len(values))
            if truth[pick].any() and (~truth[pick]).any():
                boot.append(roc_auc_score(truth[pick], values[pick]))
        numbers["model_score"]["auc_vs_pixel_rule"] = {
            "auc": float(roc_auc_score(truth, values)),
            "low": float(np.percentile(boot, 2.5)), "high": float(np.percentile(boot, 97.5))}

    per_image = []
    for row in range(len(train_images)):
        per_image.append({"training_image": row, "pixel_copies": int((pixel.memorized & (pixel.nearest_index == row)
                                                                      ).sum()),
                          "copy_space_copies": int((copies.copied & (copies.nearest_index == row)).sum())})
    per_image.sort(key=lambda entry: (-entry["copy_space_copies"], -entry["pixel_copies"], entry["training_image"]))
    numbers["copies_per_training_image"] = per_image
    numbers["training_images_copied"] = {
        "pixel": sum(entry["pixel_copies"] > 0 for entry in per_image),
        "copy_space": sum(entry["copy_space_copies"] > 0 for entry in per_image)}

    order = copies.similarity.argsort(descending=True)[:gallery_size].tolist()
    gallery = [(row, int(copies.nearest_index[row]),
                f"cos {copies.similarity[row]:.3f}{' COPY' if copies.copied[row] else ''}"
                f"{' / pixel 1/3' if pixel.memorized[row] else ''}") for row in order]

    if population is not None and quality_space is not None:
        from .evaluate import QualityReference, quality_metrics

        reference = QualityReference.build(quality_space, population, train_images)
        numbers["quality"] = quality_metrics(samples, reference)
    return numbers, gallery


def _registered_and_combined(space, samples, train_images, held_out, copies) -> dict:
    """The registered pixel rule and the combined rule (copy space OR registered), calibrated on ``held_out`` at 1%
    false positives; without enough held-out images, the registered distances only."""
    rule = RegisteredPixelRule()
    distance, nearest, _ = rule.distance(samples, train_images)
    registered = {"rule": rule.name, "details": rule.details, "distance": distance.tolist(),
                  "nearest_index": nearest.tolist()}
    if held_out is None or len(held_out) < MIN_CALIBRATION_IMAGES:
        found = 0 if held_out is None else len(held_out)
        registered["threshold_source"] = (f"not calibrated: {found} held-out population images, fewer than "
                                          f"{MIN_CALIBRATION_IMAGES}")
        return {"registered_pixel": registered}
    held_distance = rule.distance(held_out, train_images)[0]
    threshold = threshold_below(held_distance)
    registered.update(threshold=threshold, threshold_source=_calibration_source(len(held_out)),
                      copied=_share(int((distance <= threshold).sum()), len(samples)),
                      held_out_false_positives=_share(int((held_distance <= threshold).sum()), len(held_out)))
    held_similarity = max_similarity(space, held_out, train_images)[0]
    cosine, cut = calibrate_combined(held_similarity, held_distance, 0.01)
    flags = (copies.similarity >= cosine) | (distance <= cut)
    held_flags = (held_similarity >= cosine) | (held_distance <= cut)
    combined = {"rule": "copy space OR registered pixel rule: the larger standardised score, calibrated once",
                "cosine_threshold": cosine, "distance_threshold": cut,
                "threshold_source": f"union: {_calibration_source(len(held_out))}",
                "copied": _share(int(flags.sum()), len(samples)),
                "held_out_false_positives": _share(int(held_flags.sum()), len(held_out)),
                "flagged": flags.tolist(),
                "nearest_index": torch.where((distance <= cut) & ~(copies.similarity >= cosine), nearest,
                                             copies.nearest_index).tolist()}
    return {"registered_pixel": registered, "combined": combined}


def _calibration_source(num_held_out: int) -> str:
    """How a threshold was calibrated, with the false-positive rate it promises on new images (split-conformal)."""
    promise = promised_false_positive_rate(num_held_out, conformal_count(num_held_out))
    return (f"1% false positives, split-conformal on {num_held_out} held-out population images (a new image like them "
            f"is flagged with probability {promise:.2%})")


def _gallery_figure(result: AuditResult):
    import matplotlib.pyplot as plt

    columns = max(1, len(result.gallery))
    rows = 2 if result.train_images is not None else 1
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False)
    show = lambda axis, image: axis.imshow(  # noqa: E731
        ((image.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1).squeeze(), cmap="gray", vmin=0, vmax=1)
    for column, (sample_row, train_row, label) in enumerate(result.gallery):
        show(axes[0, column], result.samples[sample_row])
        axes[0, column].set_title(label, fontsize=6)
        if rows == 2:
            show(axes[1, column], result.train_images[train_row])
            axes[1, column].set_title(f"training image {train_row}", fontsize=6)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("worst copies (top: samples; bottom: their most similar training images)"
                    if rows == 2 else "samples with the highest model-only score", fontsize=8)
    return figure


def _fmt(entry: dict) -> str:
    return f"{entry['share']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}] ({entry['count']} of {entry['total']})"


def audit_markdown(numbers: dict, title: str) -> str:
    lines = [f"# Memorization audit: {title}", "",
             f"{numbers['sampling']['num_samples']} samples ({numbers['sampling']['num_inference_steps']} "
             f"{numbers['sampling']['scheduler']} steps, seed {numbers['sampling']['seed']}); images "
             f"{'x'.join(map(str, numbers['pipeline']['image_shape']))}. Shares with 95% Wilson intervals.", "",
             "| measure | share of samples |", "|---|---|"]
    score = numbers["model_score"]
    if numbers.get("pixel"):
        lines.append(f"| copies, paper's 1/3 rule (pixel space) | {_fmt(numbers['pixel']['memorized'])} |")
        copy = numbers["copy_space"]
        lines.append(f"| copies, copy-detection space (cosine >= {copy['threshold']:.3f}) | {_fmt(copy['copied'])} |")
        lines.append(f"| copies, copy space at SSCD's 0.5 (reference only) | {_fmt(copy['copied_at_sscd_0.5'])} |")
        registered, combined = numbers.get("registered_pixel", {}), numbers.get("combined")
        if "copied" in registered:
            lines.append(f"| copies, registered pixel rule (distance <= {registered['threshold']:.4f}) | "
                         f"{_fmt(registered['copied'])} |")
        if combined:
            lines.append(f"| copies, combined rule (copy space OR registered) | {_fmt(combined['copied'])} |")
    options = "".join(f", {key}={value}" for key, value in sorted(score.get("options", {}).items()))
    extracted = ("" if score.get("extracted_images") is None else
                 f"; against {score['extracted_images']} images extracted from the model")
    lines.append(f"| flagged by the model-only score ({score['method']}{options} >= {score['threshold']:.4g}"
                 f"{extracted}) | {_fmt(score['flagged'])} |")
    lines.append("")
    if numbers.get("pixel"):
        copy = numbers["copy_space"]
        lines += [f"Copy space: {copy['space']}; threshold from {copy['threshold_source']}."]
        if "held_out_false_positives" in copy:
            lines += [f"False positives on held-out images: {_fmt(copy['held_out_false_positives'])}."]
        registered, combined = numbers.get("registered_pixel"), numbers.get("combined")
        if registered:
            lines += [f"Registered pixel rule ({registered['rule']}): threshold from {registered['threshold_source']}"
                      + (f"; false positives on held-out images {_fmt(registered['held_out_false_positives'])}."
                         if "held_out_false_positives" in registered else ".")]
        if combined:
            lines += [f"Combined rule (cosine >= {combined['cosine_threshold']:.3f} OR registered distance <= "
                      f"{combined['distance_threshold']:.4f}; {combined['threshold_source']}): false positives on "
                      f"held-out images {_fmt(combined['held_out_false_positives'])}."]
        if "auc_vs_pixel_rule" in score:
            auc = score["auc_vs_pixel_rule"]
            lines += [f"Model-only score against the pixel rule's labels: ROC AUC {auc['auc']:.3f} "
                      f"[{auc['low']:.3f}, {auc['high']:.3f}] (bootstrap)."]
        copied = numbers["training_images_copied"]
        lines += ["", f"## Which training images leak ({copied['copy_space']} of {numbers['training_images']} "
                  f"copied in the copy space, {copied['pixel']} by the pixel rule)", "",
                  "| training image | copies (copy space) | copies (pixel 1/3 rule) |", "|---|---|---|"]
        leaking = [e for e in numbers["copies_per_training_image"] if e["copy_space_copies"] or e["pixel_copies"]]
        for entry in leaking[:20]:
            lines.append(f"| {entry['training_image']} | {entry['copy_space_copies']} | {entry['pixel_copies']} |")
        if not leaking:
            lines.append("| none | 0 | 0 |")
    else:
        lines += ["No training images were given: only the model-only score is reported (pass the training images "
                  "with --train_data_dir / --dataset_name / --embedded_digits for the copy rules)."]
    if numbers.get("quality"):
        quality = numbers["quality"]
        lines += ["", f"## Quality against the population ({quality['num_real_images']} images, "
                  f"{quality['feature_space']})", "", "| precision | recall | Frechet distance | KID formula |",
                  "|---|---|---|---|", f"| {quality['precision']:.3f} | {quality['recall']:.3f} | "
                  f"{quality['frechet_distance']:.2f} | {quality['kid']:.4f} +- {quality['kid_se']:.4f} |"]
    lines += ["", "![worst copies](gallery.png)", ""]
    return "\n".join(lines)


def write_audit(result: AuditResult, output_dir: str | os.PathLike, title: str) -> Path:
    """``report.md``, ``audit.json`` and ``gallery.png`` in ``output_dir``, each written atomically; returns the
    report's path. Under several processes only the main process writes (the others hold the same numbers)."""
    output_dir = Path(output_dir)
    if not is_main_process():
        return output_dir / "report.md"
    save_figure(_gallery_figure(result), output_dir / "gallery.png")
    write_text(output_dir / "audit.json", json.dumps(result.numbers, indent=2, default=float) + "\n")
    return write_text(output_dir / "report.md", audit_markdown(result.numbers, title))


DEFAULT_SCORE_THRESHOLDS = THRESHOLDS  # re-exported for the command's help text
