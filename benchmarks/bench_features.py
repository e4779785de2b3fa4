#!/usr/bin/env python
"""Feature spaces of the quality metrics: extraction speed per space, and how much the Frechet distance and the KID
formula move with the sample count alone.

    .venv/bin/python benchmarks/bench_features.py [--repeats 10 --counts 64 128 256 512]

What is measured, how, against what:
- speed: images/s of each feature space's forward pass on this CPU (torch's thread count as set, printed), on
  ``--speed_images`` random images at the space's natural input size: pixel space and the digits classifier on 8x8
  grey, population-trained CNNs (``ConvFeatureExtractor``, untrained weights: speed does not depend on them) on
  16x16 grey and 32x32 RGB; FID's Inception-v3 on 32x32 RGB when torch-fidelity and its weights are available (it
  is skipped, and says why, otherwise). Each space is timed over ``--speed_rounds`` rounds after one warm-up
  pass; median and best are printed;
- spread: "samples" are ``n`` digits drawn without replacement from the 1,797 sklearn digits (no model involved,
  so every number is the estimator's own noise at that ``n``), compared with all 1,797 digits as the population, in
  the digits-classifier space, ``--repeats`` draws per ``n``; printed: mean and standard deviation over draws of
  the Frechet distance and of the KID formula (100 subsets of min(1000, n), on features centred and scaled with
  the population's statistics, as reports do outside the Inception space), and the mean within-draw KID standard
  error. An ideal model scores these numbers; a difference between two models smaller than the spread at the same
  ``n`` is not a difference. (The draws come from the population itself, so they share images with the real
  subsets; that pulls the KID estimate a little below zero, which a model's samples would not do.)
Nothing is asserted; the numbers are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffusers_memsep.memorization import frechet_distance, kernel_distance
from diffusers_memsep.memorization.features import (
    ConvFeatureExtractor,
    digits_feature_space,
    inception_feature_space,
    load_digits_dataset,
    pixel_feature_space,
)


def time_space(space, images: torch.Tensor, rounds: int) -> tuple[float, float]:
    space(images[:8])  # warm-up
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        space(images)
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed_images", type=int, default=512)
    parser.add_argument("--speed_rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--inception_weights", default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    from diffusers_memsep.memorization.features import FeatureSpace

    generator = torch.Generator().manual_seed(0)
    grey8 = torch.rand(args.speed_images, 1, 8, 8, generator=generator) * 2 - 1
    grey16 = torch.rand(args.speed_images, 1, 16, 16, generator=generator) * 2 - 1
    rgb32 = torch.rand(args.speed_images, 3, 32, 32, generator=generator) * 2 - 1
    spaces = [("pixel space, 8x8 grey", pixel_feature_space(), grey8),
              ("digits classifier, 8x8 grey", digits_feature_space(), grey8),
              ("trained CNN, 16x16 grey", FeatureSpace("trained", "cnn", ConvFeatureExtractor(1, 16).eval()), grey16),
              ("trained CNN, 32x32 RGB", FeatureSpace("trained", "cnn", ConvFeatureExtractor(3, 32).eval()), rgb32)]
    try:
        spaces.append(("Inception-v3 (FID), 32x32 RGB", inception_feature_space(args.inception_weights), rgb32[:64]))
    except (ImportError, FileNotFoundError, ValueError) as error:
        print(f"Inception-v3 (FID): skipped: {error}")
    print(f"\nFeature extraction, {args.speed_images} images per round, {args.speed_rounds} rounds:")
    print(f"{'space':34s} {'median img/s':>13s} {'best img/s':>11s}")
    for title, space, images in spaces:
        median, best = time_space(space, images, args.speed_rounds)
        print(f"{title:34s} {median:13.0f} {best:11.0f}")

    images, _ = load_digits_dataset()
    space = digits_feature_space()
    real = space(images)
    scale = real.var(0).mean().sqrt()  # as QualityReference.kid_features does outside the Inception space
    standardised = lambda features: (features - real.mean(0)) / scale  # noqa: E731
    print(f"\nSpread from the sample draw alone: n digits drawn from the 1,797 vs all 1,797, digits-classifier space, "
          f"{args.repeats} draws per n")
    header = f"{'n':>5s} {'Frechet mean':>13s} {'Frechet std':>12s} {'KID mean':>10s} {'KID std':>9s}"
    print(header + f" {'mean KID se':>12s}")
    for count in args.counts:
        fds, kids, errors = [], [], []
        for repeat in range(args.repeats):
            rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(repeat))[:count]
            fake = real[rows]
            fds.append(frechet_distance(real, fake))
            kid, error = kernel_distance(standardised(real), standardised(fake), seed=repeat)
            kids.append(kid)
            errors.append(error)
        print(f"{count:5d} {statistics.mean(fds):13.3f} {statistics.stdev(fds):12.3f} {statistics.mean(kids):10.5f} "
              f"{statistics.stdev(kids):9.5f} {statistics.mean(errors):12.5f}")


if __name__ == "__main__":
    main()
